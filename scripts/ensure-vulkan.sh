#!/usr/bin/env bash
# Make sure a Vulkan driver (ICD) and the Vulkan loader are installed, so that
# wgpu can find an adapter. On Debian/Ubuntu a missing driver is installed with
# apt-get (Mesa's lavapipe, a CPU implementation that works anywhere).
#
# Usage: scripts/ensure-vulkan.sh [--check]
#   --check   only detect; never install (exit 1 if no driver is found)
#
# Detection: `vulkaninfo --summary` when vulkaninfo is installed, otherwise
# Vulkan ICD manifests (*.json) in the standard directories or in
# $VK_DRIVER_FILES / $VK_ICD_FILENAMES, plus the loader libvulkan.so.1.
set -euo pipefail

prog=ensure-vulkan
check_only=0
case "${1:-}" in
    "") ;;
    --check) check_only=1 ;;
    -h | --help)
        sed -n '2,11s/^# \{0,1\}//p' "$0"
        exit 0
        ;;
    *)
        echo "$prog: unknown argument: $1 (try --help)" >&2
        exit 2
        ;;
esac

say() { echo "$prog: $*"; }
err() { echo "$prog: $*" >&2; }

# macOS and Windows: wgpu uses Metal / DX12 there, Vulkan is not required.
case "$(uname -s)" in
    Darwin)
        say "macOS: wgpu uses Metal, no Vulkan driver needed"
        exit 0
        ;;
    MINGW* | MSYS* | CYGWIN*)
        say "Windows: wgpu uses DX12 (or the GPU vendor's Vulkan driver), nothing to do"
        exit 0
        ;;
esac

# Set by the checks below.
found_desc=""  # what was found, for the success message
why_missing="" # what is missing, for the failure message

# The Vulkan loader (libvulkan.so.1).
have_loader() {
    local ldconfig_bin out
    ldconfig_bin=$(command -v ldconfig || true)
    if [[ -z "$ldconfig_bin" && -x /sbin/ldconfig ]]; then
        ldconfig_bin=/sbin/ldconfig
    fi
    if [[ -n "$ldconfig_bin" ]] && out=$("$ldconfig_bin" -p 2>/dev/null); then
        if grep -q 'libvulkan\.so\.1 ' <<<"$out"; then
            return 0
        fi
    fi
    # ldconfig missing or without -p (e.g. musl): look in the usual places.
    local d
    for d in /lib /lib64 /usr/lib /usr/lib64 /usr/local/lib \
        /lib/*-linux-gnu /usr/lib/*-linux-gnu; do
        [[ -e "$d/libvulkan.so.1" ]] && return 0
    done
    return 1
}

# ICD manifests, printed one per line. Mirrors the loader: VK_DRIVER_FILES
# (or the older VK_ICD_FILENAMES) replaces the standard search directories;
# entries may be JSON files or directories.
list_icds() {
    local -a entries=()
    if [[ -n "${VK_DRIVER_FILES:-}" ]]; then
        IFS=: read -r -a entries <<<"$VK_DRIVER_FILES"
    elif [[ -n "${VK_ICD_FILENAMES:-}" ]]; then
        IFS=: read -r -a entries <<<"$VK_ICD_FILENAMES"
    else
        entries=(/usr/share/vulkan/icd.d /etc/vulkan/icd.d /usr/local/share/vulkan/icd.d)
    fi
    if [[ -n "${VK_ADD_DRIVER_FILES:-}" ]]; then
        local -a extra=()
        IFS=: read -r -a extra <<<"$VK_ADD_DRIVER_FILES"
        entries+=("${extra[@]}")
    fi
    local e f
    for e in "${entries[@]}"; do
        [[ -n "$e" ]] || continue
        if [[ -d "$e" ]]; then
            for f in "$e"/*.json; do
                [[ -f "$f" ]] && echo "$f"
            done
        elif [[ -f "$e" ]]; then
            echo "$e"
        fi
    done
    return 0
}

# vulkaninfo's device names, one per line; fails if it cannot create an
# instance or finds no device.
vulkaninfo_devices() {
    local -a cmd=(vulkaninfo --summary)
    if command -v timeout >/dev/null 2>&1; then
        cmd=(timeout 60 "${cmd[@]}")
    fi
    local out names
    out=$("${cmd[@]}" 2>/dev/null) || return 1
    names=$(sed -n 's/^[[:space:]]*deviceName[[:space:]]*=[[:space:]]*//p' <<<"$out")
    [[ -n "$names" ]] || return 1
    echo "$names"
}

check_vulkan() {
    found_desc=""
    why_missing=""
    if ! have_loader; then
        why_missing="the Vulkan loader libvulkan.so.1 is not installed"
        return 1
    fi
    if command -v vulkaninfo >/dev/null 2>&1; then
        local names
        if ! names=$(vulkaninfo_devices); then
            why_missing="vulkaninfo --summary found no usable Vulkan device"
            return 1
        fi
        found_desc="device(s): $(paste -sd ';' - <<<"$names" | sed 's/;/; /g') (vulkaninfo)"
        return 0
    fi
    local icds
    icds=$(list_icds)
    if [[ -z "$icds" ]]; then
        why_missing="no Vulkan ICD manifest (*.json) found"
        if [[ -n "${VK_DRIVER_FILES:-}${VK_ICD_FILENAMES:-}" ]]; then
            why_missing+=" in \$VK_DRIVER_FILES/\$VK_ICD_FILENAMES"
        fi
        return 1
    fi
    local names
    names=$(xargs -r -n1 basename <<<"$icds" | paste -sd ' ' - | sed 's/ /, /g')
    found_desc="ICD(s): $names (vulkaninfo not installed, so not verified)"
    return 0
}

env_hint() {
    if [[ -n "${VK_DRIVER_FILES:-}" ]]; then
        err "note: VK_DRIVER_FILES=$VK_DRIVER_FILES overrides the system driver directories; unset it to use the installed drivers"
    elif [[ -n "${VK_ICD_FILENAMES:-}" ]]; then
        err "note: VK_ICD_FILENAMES=$VK_ICD_FILENAMES overrides the system driver directories; unset it to use the installed drivers"
    fi
}

if check_vulkan; then
    say "Vulkan driver found: $found_desc"
    exit 0
fi

err "no Vulkan driver: $why_missing"

if [[ "$check_only" == 1 ]]; then
    env_hint
    exit 1
fi

if command -v apt-get >/dev/null 2>&1; then
    sudo_cmd=()
    if [[ "$(id -u)" != 0 ]]; then
        if command -v sudo >/dev/null 2>&1; then
            sudo_cmd=(sudo)
        else
            err "not root and sudo is not available; as root, run:"
            err "  apt-get update && apt-get install -y mesa-vulkan-drivers libvulkan1 vulkan-tools"
            exit 1
        fi
    fi
    pkgs=(mesa-vulkan-drivers libvulkan1 vulkan-tools)
    say "installing ${pkgs[*]} with apt-get"
    ${sudo_cmd[@]+"${sudo_cmd[@]}"} env DEBIAN_FRONTEND=noninteractive apt-get update -q
    ${sudo_cmd[@]+"${sudo_cmd[@]}"} env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -q --no-install-recommends "${pkgs[@]}"
    if check_vulkan; then
        say "installed ${pkgs[*]}; Vulkan driver found: $found_desc"
        exit 0
    fi
    err "still no Vulkan driver after installing ${pkgs[*]}: $why_missing"
    env_hint
    exit 1
fi

cat >&2 <<'EOF'
ensure-vulkan: apt-get is not available, so no driver was installed automatically.
Install a Vulkan driver and the Vulkan loader, then run this again:
  * your GPU vendor's Vulkan driver (NVIDIA's proprietary driver, or Mesa's
    RADV / ANV for AMD / Intel), or
  * Mesa's lavapipe, a CPU-only Vulkan driver that works without a GPU:
      Fedora/RHEL:  sudo dnf install mesa-vulkan-drivers vulkan-loader vulkan-tools
      Arch Linux:   sudo pacman -S vulkan-swrast vulkan-icd-loader vulkan-tools
EOF
env_hint
exit 1
