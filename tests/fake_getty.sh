#!/bin/bash
# A getty stand-in on a pty: prints a login prompt, takes a user name, then runs an
# interactive bash, the way a device's serial console does after a passwordless login.
printf 'Debian GNU/Linux 12 testhost ttyS0\n\ntesthost login: '
read -r user
printf 'Linux testhost\n'
exec env -i HOME=/tmp PATH=/usr/bin:/bin USER="$user" bash --norc --noprofile -i
