#!/usr/bin/env bash
# Install the built-in offline image sources, idempotently: running it twice does no work the second time.
#
#   fashion_mnist  Debian dataset-fashion-mnist  -> /usr/share/datasets/fashion-mnist/*.gz
#   clipart        Debian openclipart-png        -> /usr/share/openclipart/png/**.png
#   emoji          npm emoji-datasource-google   -> $MICRO_DIFFUSION_DATA/emoji-datasource-google/
#                                                   (emoji.json, img/google/64/*.png)
#
# Usage: scripts/get_offline_data.sh [emoji] [fashion_mnist] [clipart]     (no argument: all three)
# Environment: MICRO_DIFFUSION_DATA (default ~/.cache/micro_diffusion) is where npm packages are unpacked;
#              the readers look there too. Debian packages need root (or sudo) for apt-get.
set -euo pipefail

DATA_DIR="${MICRO_DIFFUSION_DATA:-$HOME/.cache/micro_diffusion}"
EMOJI_PACKAGE="emoji-datasource-google"
EMOJI_VERSION="16.0.0"

log() { echo "[get_offline_data] $*"; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
        log "need root for: $*"; return 1
    fi
}

apt_install() {  # apt_install PACKAGE: install a Debian package unless it is already there
    local package="$1"
    if dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed"; then
        log "$package: already installed"
        return
    fi
    log "$package: installing with apt-get"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$package"
}

get_emoji() {
    local target="$DATA_DIR/$EMOJI_PACKAGE"
    if [ -f "$target/emoji.json" ] && [ -d "$target/img/google/64" ]; then
        log "$EMOJI_PACKAGE: already in $target"
        return
    fi
    command -v npm >/dev/null || apt_install npm
    mkdir -p "$DATA_DIR"
    local work
    work="$(mktemp -d "$DATA_DIR/.download.XXXXXX")"   # same file system as the target: the rename is atomic
    log "$EMOJI_PACKAGE@$EMOJI_VERSION: fetching with npm pack"
    (cd "$work" && npm pack --silent "$EMOJI_PACKAGE@$EMOJI_VERSION" >/dev/null)
    # Only the 64 px images, their index and the licence (the sprite sheets are most of the 78 MB).
    tar -xzf "$work/$EMOJI_PACKAGE-$EMOJI_VERSION.tgz" -C "$work" \
        package/emoji.json package/img/google/64 package/LICENSE
    rm -rf "$target"
    mv "$work/package" "$target"   # appears only once complete, so an interrupted run is simply redone
    rm -rf "$work"
    log "$EMOJI_PACKAGE: $(find "$target/img/google/64" -name '*.png' | wc -l) images in $target"
}

main() {
    local sources=("$@")
    [ ${#sources[@]} -eq 0 ] && sources=(emoji fashion_mnist clipart)
    for source in "${sources[@]}"; do
        case "$source" in
            emoji) get_emoji ;;
            fashion_mnist) apt_install dataset-fashion-mnist ;;
            clipart) apt_install openclipart-png ;;
            *) log "unknown source '$source' (expected: emoji fashion_mnist clipart)"; exit 2 ;;
        esac
    done
}

main "$@"
