#!/bin/sh
# Installs toposerve into /opt/toposerve of a Debian bookworm root that has python3 and
# python3-venv. Runs inside the root: as a RUN step of the Dockerfile, and in the chroot that
# `make image` (hack/image/build.sh) builds with mmdebstrap, so both images are made the same way.
# Usage: install.sh DIR   (DIR holds requirements.txt, every wheel it pins and the toposerve wheel)
# Nothing is downloaded here: pip installs from DIR only, each wheel checked against its hash.
set -eu
dir=$1
# Hermetic: no pip configuration from the builder's environment.
unset PIP_FIND_LINKS PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_CERT
export PIP_CONFIG_FILE=/dev/null PIP_DISABLE_PIP_VERSION_CHECK=1
python3 -m venv /opt/toposerve
/opt/toposerve/bin/pip install -q --no-cache-dir --no-index --find-links "$dir" --only-binary=:all: \
  --require-hashes -r "$dir/requirements.txt"
/opt/toposerve/bin/pip install -q --no-cache-dir --no-index --no-deps "$dir"/toposerve-*.whl
# pip and setuptools are not needed at run time. The kubernetes client ships a second, asyncio
# copy of itself (kubernetes/aio, 68 MB) that nothing here imports (kopf speaks aiohttp itself).
/opt/toposerve/bin/pip uninstall -q -y pip setuptools
site=$(/opt/toposerve/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
rm -rf "$site/kubernetes/aio"
# Byte-compile once: the root file system is read-only at run time.
/opt/toposerve/bin/python -m compileall -q "$site"
DEBIAN_FRONTEND=noninteractive apt-get purge -y -q python3-venv python3.11-venv python3-pip-whl \
  python3-setuptools-whl >/dev/null
DEBIAN_FRONTEND=noninteractive apt-get autoremove -y -q --purge >/dev/null
rm -rf /var/lib/apt/lists/* /var/cache/apt/* /var/cache/debconf/*-old /var/lib/dpkg/*-old \
  /var/log/apt /var/log/dpkg.log /var/log/alternatives.log
# The user every pod runs as (runAsUser 65532); no home, no shell.
grep -q '^toposerve:' /etc/group || echo 'toposerve:x:65532:' >>/etc/group
grep -q '^toposerve:' /etc/passwd ||
  echo 'toposerve:x:65532:65532:toposerve:/nonexistent:/usr/sbin/nologin' >>/etc/passwd
/opt/toposerve/bin/toposerve --version
