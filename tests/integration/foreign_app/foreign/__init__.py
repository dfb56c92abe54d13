"""A foreign Flower app for the site executor's tests (never part of idc-fl)."""
