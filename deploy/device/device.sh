#!/usr/bin/env bash
# The full `idc-sim reproduce` on a lent GPU machine (the workplace's device tool), which
# starts bare: no flwr, opacus or ray, and no ../shared beside the checkout.
#
#   bash deploy/device/device.sh pack      here: wheels + real patches -> .device/chunk-NN
#   bash deploy/device/device.sh stage N   there, once per chunk: keep chunk N in /tmp
#   bash deploy/device/device.sh run [--budget S] [reproduce options]
#                                          there, with the last chunk: unpack, install, run
#
# A call carries at most 64 MiB with the checkout, so the payload (about 140 MB, mostly the
# patches) travels in chunks, one a call: each call names `.device/chunk-NN` and
# `.device/MANIFEST` in carry, and the calls follow each other at once (the machine goes back
# when idle for about 30 s). deploy/device/README.md has the calls, word for word.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
PAYLOAD=/tmp/idc-payload  # on the device machine: chunks, then the unpacked payload
DATA_NAME=idc-real

die() { echo "device.sh: $*" >&2; exit 1; }

pack() {
    local pyver=${PYVER:-3.12} chunk_mb=${CHUNK_MB:-50}
    local data=${IDC_REAL_DATA:-$ROOT/../shared/data/idc-real}
    local py=$ROOT/.venv/bin/python
    [ -x "$py" ] || die "no $py: run \`make setup\` first (the versions carried are its own)"
    [ -d "$data" ] || die "no patches at $data: set IDC_REAL_DATA to the Kaggle-layout folder"
    work=$(mktemp -d)  # global: the EXIT trap reads it after pack returns
    trap 'rm -rf "$work"' EXIT
    # the versions CI tests: this checkout's .venv, for the names carry.txt lists
    "$py" - "$HERE/carry.txt" > "$work/req.txt" <<'EOF'
import re, sys
from importlib.metadata import distributions
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
have = {norm(d.metadata["Name"]): d.version for d in distributions()}
names = [ln.strip() for ln in open(sys.argv[1]) if ln.strip() and not ln.startswith("#")]
missing = [n for n in names if norm(n) not in have]
if missing:
    sys.exit(f"device.sh: not installed in .venv: {', '.join(missing)}; run `make setup`")
print("\n".join(f"{n}=={have[norm(n)]}" for n in names))
EOF
    echo "pack: downloading $(wc -l < "$work/req.txt") wheels for CPython $pyver ..."
    local platforms=()
    for tag in manylinux_2_{17,24,27,28,31,34}_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
        platforms+=(--platform "$tag")
    done
    "$py" -m pip download -q --no-deps --only-binary=:all: --implementation cp \
        --python-version "$pyver" "${platforms[@]}" -d "$work/dl" -r "$work/req.txt"
    mkdir -p "$work/payload"
    "$py" "$HERE/wheels.py" "$work/dl" "$work/wheels"
    echo "pack: compressing the wheels and the patches of $data ..."
    tar -C "$work" -cf - wheels | xz -T0 -6 > "$work/payload/wheels.tar.xz"
    tar -C "$(dirname "$data")" -cf - --transform "s|^$(basename "$data")|$DATA_NAME|" \
        "$(basename "$data")" | gzip -1 > "$work/payload/data.tar.gz"
    echo "$pyver" > "$work/payload/python-version"
    rm -rf "$ROOT/.device"
    mkdir "$ROOT/.device"
    tar -C "$work/payload" -cf - . | split -b "${chunk_mb}M" -d -a 2 - "$ROOT/.device/chunk-"
    (cd "$ROOT/.device" && sha256sum chunk-* > MANIFEST)
    local n
    n=$(wc -l < "$ROOT/.device/MANIFEST")
    du -sh "$ROOT"/.device/chunk-*
    echo "pack: $n chunks in .device/; on the device machine: stage 0 .. $((n - 2)), then run" \
        "with chunk $((n - 1)) (deploy/device/README.md)"
}

stage() {
    local n=${1:?stage needs the chunk number}
    local chunk
    chunk=$(printf 'chunk-%02d' "$n")
    [ -f "$ROOT/.device/$chunk" ] || die "$chunk was not carried: name .device/$chunk in carry"
    [ -f "$ROOT/.device/MANIFEST" ] || die "MANIFEST was not carried: name .device/MANIFEST"
    mkdir -p "$PAYLOAD"
    cp "$ROOT/.device/$chunk" "$ROOT/.device/MANIFEST" "$PAYLOAD/"
    (cd "$PAYLOAD" && grep " $chunk\$" MANIFEST | sha256sum -c --quiet -) \
        || die "$chunk arrived damaged: carry it again"
    echo "stage: $chunk kept in $PAYLOAD ($(ls "$PAYLOAD"/chunk-* | wc -l) of" \
        "$(wc -l < "$PAYLOAD/MANIFEST") chunks there)"
}

install() {
    # A venv of its own whose .pth adds the image's site-packages (torch, numpy, ...) after
    # its own, so the carried wheels take precedence and the console scripts (flower-superlink,
    # flwr-simulation, ...) sit beside its python, where flowerctl looks for them.
    local base venv=$PAYLOAD/venv
    [ -x "$venv/bin/python" ] && return 0
    base=$(python3 -c 'import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))') \
        || die "the machine's python3 has no torch"
    python3 -m venv --without-pip "$venv" || die "python3 -m venv failed on this machine"
    local site
    site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    echo "import site; site.addsitedir('$base')" > "$site/zz-image-packages.pth"
    "$venv/bin/python" -m pip install -q --no-index --no-deps --ignore-installed \
        --no-compile "$PAYLOAD"/wheels/*.whl
}

run() {
    local budget=540
    if [ "${1:-}" = --budget ]; then budget=$2; shift 2; fi
    local out=${OUT:-$ROOT/.device/out}
    mkdir -p "$out" "$PAYLOAD"
    [ -f "$ROOT/.device/MANIFEST" ] || die "MANIFEST was not carried: name .device/MANIFEST"
    for chunk in "$ROOT"/.device/chunk-*; do  # the ones this call carried
        [ -f "$chunk" ] || continue
        [ -f "$PAYLOAD/$(basename "$chunk")" ] || cp "$chunk" "$PAYLOAD/"
    done
    cp "$ROOT/.device/MANIFEST" "$PAYLOAD/"
    if [ ! -f "$PAYLOAD/unpacked" ]; then
        local missing
        missing=$(cd "$PAYLOAD" && awk '{print $2}' MANIFEST | while read -r c; do
            [ -f "$c" ] || printf '%s ' "$c"; done)
        [ -z "$missing" ] || die "not staged on this machine: ${missing}(stage each, then run)"
        (cd "$PAYLOAD" && sha256sum -c --quiet MANIFEST) || die "a chunk is damaged: restage it"
        cat "$PAYLOAD"/chunk-* | tar -C "$PAYLOAD" -xf -
        xz -dc "$PAYLOAD/wheels.tar.xz" | tar -C "$PAYLOAD" -xf -
        tar -C "$PAYLOAD" -xzf "$PAYLOAD/data.tar.gz"
        rm -f "$PAYLOAD"/chunk-* "$PAYLOAD/wheels.tar.xz" "$PAYLOAD/data.tar.gz"
        touch "$PAYLOAD/unpacked"
    fi
    install
    export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 PYTHONUNBUFFERED=1
    export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 PYTHONPATH=$ROOT
    export IDC_CACHE_DIR=$PAYLOAD/cache
    local log=$out/run.log rc=0
    { date -u; nvidia-smi -L 2>/dev/null || echo "no nvidia-smi"; } > "$log"
    cd "$ROOT"
    rm -rf "$PAYLOAD/run"  # an earlier call's report must not come back as this one's
    # INT first: reproduce ends the row in flight as a stopped command would; its report was
    # written after the last row that finished
    timeout --signal=INT --kill-after=20 "$budget" "$PAYLOAD/venv/bin/python" -m simulation.cli \
        reproduce --data "$PAYLOAD/$DATA_NAME" --out "$PAYLOAD/run" "$@" >> "$log" 2>&1 || rc=$?
    echo "device.sh: reproduce exit status $rc" >> "$log"
    for f in report.md results.json; do
        [ -f "$PAYLOAD/run/$f" ] && cp "$PAYLOAD/run/$f" "$out/"
    done
    [ -d "$PAYLOAD/run/figures" ] && tar -C "$PAYLOAD/run" -czf "$out/figures.tar.gz" figures
    tail -n 30 "$log"
    return "$rc"
}

case "${1:-}" in
    pack) pack ;;
    stage) shift; stage "$@" ;;
    run) shift; run "$@" ;;
    *) die "usage: device.sh pack | stage N | run [--budget SECONDS] [reproduce options]" ;;
esac
