#!/bin/sh
# Writes the Redis ACL file of hotreload's users from their passwords.
#
#   gen-users-acl.sh OUTPUT
#
# Passwords come from the environment (in Kubernetes from the Secret hotreload-redis-users), or
# from files named by the same variable with _FILE appended (docker secrets):
#   HOTRELOAD_PUBLISHER_PASSWORD   the publisher sidecar (`hotreload watch`)
#   HOTRELOAD_SUBSCRIBER_PASSWORD  the Subscriber in every app worker
#   HOTRELOAD_OPERATOR_PASSWORD    optional: read-only user for hotreload status/history/wait
#   HOTRELOAD_PREFIX               key prefix (default hotreload; must match --prefix)
# Passwords must be at least 16 of A-Z a-z 0-9 . _ ~ - (they go into unix://USER:PASSWORD@...
# URLs as they are); `openssl rand -hex 32` makes a good one. The file stores SHA-256 hashes
# only, and is written with mode 600, whole or not at all. (Redis ACL files cannot hold
# comments, so the explanation is here.)
#
# Least privilege, command by command (tests/test_deploy.py runs the real publisher,
# subscribers and CLI under these users and checks what is refused):
#   publisher   compare-and-publish: EVALSHA (SCRIPT LOAD when the script cache is empty) whose
#               script runs XREVRANGE + XADD on :events; EXISTS on :events every second; the
#               ack follower's XREAD/XRANGE on :acks, XREVRANGE on :events, HGETALL on
#               :workers, TIME; SCAN so that `hotreload status` without a KEY works from the
#               publisher container. Read+write on :events, read-only on :acks and :workers.
#   subscriber  XREVRANGE/XRANGE/XREAD on :events (read-only: a worker can never publish),
#               XADD (with MAXLEN ~) on :acks, HSET on :workers (write-only), CLIENT SETNAME.
#               No XTRIM, XDEL, DEL, EVAL, FLUSH*, CONFIG, ... .
#   operator    read-only: EXISTS, XRANGE, XREVRANGE, HGETALL, TIME, SCAN.
#   default     off: no password can log it in, and it may run nothing.
# PING is allowed to everybody (probes). AUTH and HELLO need no permission.
set -eu

out=${1:?usage: gen-users-acl.sh OUTPUT}
prefix=${HOTRELOAD_PREFIX:-hotreload}

fail() {
    echo "gen-users-acl.sh: $*" >&2
    exit 1
}

case $prefix in
    '' | *[!A-Za-z0-9._:-]*) fail "HOTRELOAD_PREFIX '$prefix' must be letters, digits, '.', '_', ':' or '-'" ;;
esac

# password NAME [optional]: the value of $NAME, else the content of the file named by ${NAME}_FILE
password() {
    eval "value=\${$1:-}"
    eval "file=\${$1_FILE:-}"
    if [ -z "$value" ] && [ -n "$file" ]; then
        [ -r "$file" ] || fail "$1_FILE: cannot read $file"
        value=$(cat "$file")
    fi
    if [ -z "$value" ]; then
        [ "${2:-}" = optional ] && return 0
        fail "$1 (or $1_FILE) is not set: create the Secret with the users' passwords (deploy/README.md)"
    fi
    case $value in
        *[!A-Za-z0-9._~-]*) fail "$1 may only contain A-Z a-z 0-9 . _ ~ - (it goes into a URL as it is)" ;;
    esac
    [ "${#value}" -ge 16 ] || fail "$1 is shorter than 16 characters (try: openssl rand -hex 32)"
    printf '%s' "$value"
}

sha256() {
    printf '%s' "$1" | sha256sum | cut -d ' ' -f 1
}

publisher=$(password HOTRELOAD_PUBLISHER_PASSWORD)
subscriber=$(password HOTRELOAD_SUBSCRIBER_PASSWORD)
operator=$(password HOTRELOAD_OPERATOR_PASSWORD optional)
[ "$publisher" != "$subscriber" ] || fail "the publisher and subscriber passwords must differ"

p=$prefix
umask 077
tmp="$out.tmp.$$"
{
    echo "user default reset off"
    echo "user publisher reset on #$(sha256 "$publisher") resetchannels" \
        "+ping +client|setname +evalsha +script|load +xadd +xrevrange +xrange +xread" \
        "+exists +hgetall +time +scan" \
        "%RW~$p:{*}:events %R~$p:{*}:acks %R~$p:{*}:workers"
    echo "user subscriber reset on #$(sha256 "$subscriber") resetchannels" \
        "+ping +client|setname +xrevrange +xrange +xread +xadd +hset" \
        "%R~$p:{*}:events %W~$p:{*}:acks %W~$p:{*}:workers"
    if [ -n "$operator" ]; then
        echo "user operator reset on #$(sha256 "$operator") resetchannels" \
            "+ping +client|setname +exists +xrange +xrevrange +hgetall +time +scan" \
            "%R~$p:*"
    fi
} >"$tmp"
mv -f "$tmp" "$out"
echo "gen-users-acl.sh: wrote $out (users: publisher, subscriber${operator:+, operator}; default off)" >&2
