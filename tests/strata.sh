#!/usr/bin/env bash
# Set-up and entry point for a fresh Debian machine (root, Rust stable):
#   tests/strata.sh run [strata run options]   boot the appliance, serve NBD on 127.0.0.1:10809
#   tests/strata.sh test                       run the whole test suite
#   tests/strata.sh bench                      run the benchmark (prints figures)
#   tests/strata.sh bench-raid5                raid5 against stripe, hosted and appliance
#   tests/strata.sh bench-crypt                plain, eli and gbde; QEMU's LUKS driver beside eli
#   tests/strata.sh bench-iscsi                iSCSI: hosted and appliance beside tgt, and NBD
# Installs what is missing (QEMU, NBD clients and peers, the Rust target), or
# stops with a message naming what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

want() { command -v "$1" >/dev/null 2>&1 || need_pkgs+=("$2"); }

missing_pkgs() {
    need_pkgs=()
    want qemu-system-x86_64 qemu-system-x86
    if [ "${1:-}" != run ]; then
        want qemu-io qemu-utils
        want qemu-nbd qemu-utils
        want nbdinfo libnbd-bin
        want nbdkit nbdkit
        want fio fio
        want ss iproute2
        want sfdisk fdisk
        want sgdisk gdisk
        want cryptsetup cryptsetup-bin
        want iscsi-test-cu libiscsi-bin
        want tgtd tgt
        /usr/bin/python3 -c 'import nbd' >/dev/null 2>&1 || need_pkgs+=(python3-libnbd)
        # QEMU's iscsi:// driver (qemu-img and qemu-io over iSCSI).
        [ -e /usr/lib/x86_64-linux-gnu/qemu/block-iscsi.so ] || need_pkgs+=(qemu-block-extra)
        # The persistent-reservation client (tests/c/iscsi-pr.c) builds
        # against libiscsi.
        want gcc gcc
        [ -e /usr/include/iscsi/iscsi.h ] || need_pkgs+=(libiscsi-dev)
    fi
}

install_deps() {
    # Two passes: installing Debian's QEMU can replace a qemu-utils of
    # another version (and so take qemu-img, qemu-io and qemu-nbd away),
    # which the second pass puts back at the matching version.
    for pass in 1 2; do
        missing_pkgs "${1:-}"
        [ ${#need_pkgs[@]} -eq 0 ] && break
        if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
            echo "strata: missing: ${need_pkgs[*]} (install them with: apt-get install -y ${need_pkgs[*]})" >&2
            exit 1
        fi
        echo "strata: installing ${need_pkgs[*]}" >&2
        export DEBIAN_FRONTEND=noninteractive
        [ "$pass" = 1 ] && apt-get update -qq >&2
        apt-get install -y -qq "${need_pkgs[@]}" >&2 || {
            echo "strata: apt-get install ${need_pkgs[*]} failed" >&2
            exit 1
        }
    done
    missing_pkgs "${1:-}"
    if [ ${#need_pkgs[@]} -gt 0 ]; then
        echo "strata: still missing after apt-get: ${need_pkgs[*]}" >&2
        exit 1
    fi
    if ! command -v cargo >/dev/null 2>&1; then
        echo "strata: cargo not found: install Rust stable (rustup) first" >&2
        exit 1
    fi
    if ! rustup target list --installed 2>/dev/null | grep -qx x86_64-unknown-none; then
        echo "strata: adding the Rust target x86_64-unknown-none" >&2
        rustup target add x86_64-unknown-none >&2 || {
            echo "strata: 'rustup target add x86_64-unknown-none' failed" >&2
            exit 1
        }
    fi
}

cmd=${1:-}
shift || true
case "$cmd" in
run)
    install_deps run
    cargo build --release -q -p image --bin strata
    exec target/release/strata run "$@"
    ;;
test)
    install_deps test
    cargo build --release -q -p image --bin strata
    target/release/strata build >/dev/null
    cargo fmt --all -- --check
    cargo clippy --workspace --all-targets -q -- -D warnings
    cargo clippy -q -p appliance --bin strata-kernel --target x86_64-unknown-none \
        --target-dir target/kernel -- -D warnings
    # The model and fuzz tests of geom, net and bufcache again, in the test profile
    # so integer overflow panics instead of wrapping (about 30 s, plus a
    # debug build of the crates); a test in geom and in net fails if the
    # variable is set and overflow wraps.
    STRATA_OVERFLOW_CHECKS=1 cargo test -q -p geom -p net -p bufcache -- \
        --test-threads="${STRATA_TEST_THREADS:-2}"
    cargo test --workspace --release -- --test-threads="${STRATA_TEST_THREADS:-2}"
    ;;
bench)
    install_deps bench
    cargo build --release -q -p image --bin strata
    cargo run --release -q -p strata-tests --bin bench -- "$@"
    exec cargo run --release -q -p strata-tests --bin bench_layers -- "$@"
    ;;
bench-raid5)
    install_deps bench
    cargo build --release -q -p image --bin strata
    exec cargo run --release -q -p strata-tests --bin bench_raid5 -- "$@"
    ;;
bench-crypt)
    install_deps bench
    cargo build --release -q -p image --bin strata
    exec cargo run --release -q -p strata-tests --bin bench_crypt -- "$@"
    ;;
bench-iscsi)
    install_deps bench
    cargo build --release -q -p image --bin strata
    exec cargo run --release -q -p strata-tests --bin bench_iscsi -- "$@"
    ;;
*)
    echo "usage: tests/strata.sh run|test|bench|bench-raid5|bench-crypt|bench-iscsi [options]" >&2
    exit 2
    ;;
esac
