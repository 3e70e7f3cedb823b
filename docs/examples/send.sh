#!/bin/sh
# Send events to router over its Unix socket from the shell, and print the acks.
# One JSON event per line; one ack line per line, in order, after the commit.
set -eu
SOCKET=${ROUTER_SOCKET:-router-data/router.sock}

# nc -U (OpenBSD netcat): -N closes our side at the end of input, then reads the acks.
printf '%s\n' \
  '{"type":"track","userId":"u1","event":"Signed Up","properties":{"plan":"pro"}}' \
  '{"batch":[{"type":"identify","userId":"u1","traits":{"plan":"pro"}},{"type":"page","userId":"u1","name":"Home"}]}' \
  | nc -UN "$SOCKET"

# socat: -t 5 waits up to 5 s for the acks after the end of input. A messageId of your own
# makes a resend safe: the daemon stores the same messageId once.
id=$(cat /proc/sys/kernel/random/uuid)
printf '{"type":"track","userId":"u1","event":"Order Completed","messageId":"%s"}\n' "$id" \
  | socat -t 5 - "UNIX-CONNECT:$SOCKET"
