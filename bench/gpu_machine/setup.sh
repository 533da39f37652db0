# Source from the repository root on the GPU machine: `source bench/gpu_machine/setup.sh DIR`, DIR being what
# pack.sh made (carried there). Installs nothing system-wide except Mooncake's bind shim: epd imports from
# /tmp/epdpkg (links to this tree), its wheels from /tmp/epdsite, and a Debian library from the debs only where
# the system lacks it. Ends in /tmp (the repository root's epd/ holds no subpackages); EPD_REPO is the root.
pack="${1:?usage: source bench/gpu_machine/setup.sh DIR}"
[ -d /tmp/epdsite ] || tar -C /tmp -xJf "$pack/site.tar.xz"
mkdir -p /tmp/sys /tmp/syslib
for f in "$pack"/debs/*.deb; do dpkg -x "$f" /tmp/sys; done
export LD_LIBRARY_PATH=/tmp/syslib
for _ in 1 2 3 4 5 6; do  # the missing libraries, then theirs
  missing=$(for b in /tmp/epdsite/mooncake/store.so /tmp/epdsite/mooncake/engine.so /tmp/epdsite/mooncake/mooncake_master \
    /tmp/syslib/*; do ldd "$b" 2>/dev/null; done | awk '/not found/{print $1}' | sort -u)
  [ -z "$missing" ] && break
  for lib in $missing; do
    f=$(find /tmp/sys -name "$lib" | head -1)
    if [ -n "$f" ]; then ln -sf "$(readlink -f "$f")" "/tmp/syslib/$lib"; else echo "no $lib among the debs"; fi
  done
done
mkdir -p /tmp/epdpkg/epd && cp epd/__init__.py /tmp/epdpkg/epd/
for p in core schemas connectors workers gateway ops tools; do ln -sfn "$PWD/$p" "/tmp/epdpkg/epd/$p"; done
command -v cc >/dev/null && cc -O2 -shared -fPIC -o /usr/local/lib/epd_bind_shim.so ops/bind_shim.c -ldl
export PYTHONPATH=/tmp/epdpkg:/tmp/epdsite PATH=/tmp/epdsite/bin:$PATH HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
  PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export EPD_REPO=$PWD
cd /tmp
python3 -c "import mooncake.store, nats, msgspec, fastapi, epd.ops.up, torch; print('epd imports;', torch.cuda.get_device_name(0))"
