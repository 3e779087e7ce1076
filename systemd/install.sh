#!/usr/bin/env bash
# Installs codelupe-trainer as a systemd service. Run as root from the repository root.
set -euo pipefail
prefix=/opt/codelupe-trainer
id codelupe >/dev/null 2>&1 || useradd --system --home-dir /var/lib/codelupe-trainer --shell /usr/sbin/nologin codelupe
# A GPU box needs the video/render groups to open /dev/nvidia*.
for group in video render; do getent group "$group" >/dev/null && usermod -aG "$group" codelupe; done
mkdir -p "$prefix" /etc/codelupe-trainer
# Run from a checkout elsewhere, copy it in; run from $prefix itself (the README's clone), it is already there.
if [ "$(realpath .)" != "$(realpath "$prefix")" ]; then
    cp -r codelupe_trainer pyproject.toml README.md Makefile "$prefix"/
fi
test -x "$prefix/.venv/bin/python" || python3 -m venv "$prefix/.venv"
"$prefix/.venv/bin/pip" install -q --upgrade pip
# On the GPU box, install the CUDA build of torch first (see README), then the project.
"$prefix/.venv/bin/pip" install -q "$prefix"
test -f /etc/codelupe-trainer/codelupe.toml || cp config/codelupe.toml /etc/codelupe-trainer/codelupe.toml
if [ ! -f /etc/codelupe-trainer/secrets.env ]; then
    printf 'CODELUPE_DATABASE__URL=postgresql://codelupe:CHANGE_ME@127.0.0.1:5432/codelupe\nWANDB_API_KEY=\n' \
        > /etc/codelupe-trainer/secrets.env
fi
chown root:codelupe /etc/codelupe-trainer/secrets.env
chmod 0640 /etc/codelupe-trainer/secrets.env
install -m 0644 systemd/codelupe-trainer.service /etc/systemd/system/codelupe-trainer.service
install -m 0644 systemd/codelupe-trainer-join@.service "/etc/systemd/system/codelupe-trainer-join@.service"
systemctl daemon-reload
echo "installed. Edit /etc/codelupe-trainer/secrets.env, then: systemctl enable --now codelupe-trainer"
echo "(another machine of a multi-node group: systemctl enable --now codelupe-trainer-join@K, K its node rank)"
