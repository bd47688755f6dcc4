#!/usr/bin/env bash
# The side-by-side table of docs/benchmarks.md, in one command:
#
#   scripts/bench-table.sh            # every target, ~3 minutes
#   DURATION=5 scripts/bench-table.sh # shorter phases
#   BUILD=0 scripts/bench-table.sh    # use the binaries already built
#
# Starts each target in turn on 127.0.0.1 — the do-nothing axum server
# (`benches/load.rs --serve-null`), calmkv 1 node (`sync` PUT, counter incr and
# GET; `none` PUT), Redis with `appendfsync always` and `everysec`, etcd
# 3 members when `etcd` is installed, and calmkv 3 nodes (`w=1` PUT and counter
# incr) — drives it with the same bounded load (wrk -t2 -c32 with the Lua
# scripts beside this file: a new key per PUT, counters on 100,000 random keys,
# GETs of keys the PUT run wrote; `redis-benchmark -c 32 -d 100 -r 100000` for
# Redis), reads the server's CPU time from /proc/PID/stat, stops it, and prints
# one markdown table: req/s, p50, p99, server CPU per request, and the ratios
# to Redis `always` and to the do-nothing server.
#
# Installs wrk and redis-server with apt-get when missing (it says so on
# stderr). Everything it starts is stopped on exit, also on Ctrl-C.
set -euo pipefail

DURATION=${DURATION:-8}      # seconds per measured run
WARMUP=${WARMUP:-1}          # seconds of unrecorded load before each run
CONNECTIONS=${CONNECTIONS:-32}
THREADS=${THREADS:-2}
REDIS_REQUESTS_ALWAYS=${REDIS_REQUESTS_ALWAYS:-100000}
REDIS_REQUESTS_EVERYSEC=${REDIS_REQUESTS_EVERYSEC:-300000}

repo=$(cd "$(dirname "$0")/.." && pwd)
lua="$repo/scripts/bench"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$repo/target}
work=$(mktemp -d /tmp/calmkv-bench-table.XXXXXX)
pids=()

cleanup() {
    for pid in "${pids[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${pids[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

say() { echo "bench-table: $*" >&2; }

need() { # need COMMAND PACKAGE
    command -v "$1" >/dev/null && return
    say "$1 is missing: installing the $2 package with apt-get"
    apt-get install -y "$2" >/dev/null
}
need wrk wrk
need redis-server redis-server
need redis-benchmark redis-tools

calmkv="$CARGO_TARGET_DIR/release/calmkv"
if [[ ${BUILD:-1} == 0 ]]; then
    say "BUILD=0: using the binaries already built"
    load=$(ls -t "$CARGO_TARGET_DIR"/release/deps/load-* 2>/dev/null | grep -v '\.d$' | head -1)
else
    say "building calmkv and the load harness (release)"
    (cd "$repo" && cargo build --release --bin calmkv >&2)
    load=$(cd "$repo" && cargo bench --bench load --no-run 2>&1 \
        | grep -o '(.*deps/load-[0-9a-f]*)' | tr -d '()' | tail -1)
fi
[[ -x $load ]] || { say "cannot find the load harness binary"; exit 1; }

ticks=$(getconf CLK_TCK)
base_port=$((20000 + RANDOM % 20000))

cpu_seconds() { # cpu_seconds PID...: utime + stime of the processes, summed
    local total=0 pid fields
    for pid in "$@"; do
        fields=$(sed 's/.*) //' "/proc/$pid/stat")
        total=$(awk -v f="$fields" -v t="$ticks" -v s="$total" \
            'BEGIN { split(f, a, " "); printf "%.4f", s + (a[12] + a[13]) / t }')
    done
    echo "$total"
}

wait_for_line() { # wait_for_line FILE PATTERN: the first matching line, within 30 s
    local i
    for i in $(seq 300); do
        if grep -m1 "$2" "$1" 2>/dev/null; then return 0; fi
        sleep 0.1
    done
    say "no line matching '$2' in $1"; cat "$1" >&2; return 1
}

to_ms() { # wrk's "1.23ms" / "456.00us" / "1.02s" → milliseconds
    awk -v v="$1" 'BEGIN {
        if (v ~ /us$/) { sub(/us$/, "", v); printf "%.2f", v / 1000 }
        else if (v ~ /ms$/) { sub(/ms$/, "", v); printf "%.2f", v }
        else if (v ~ /s$/) { sub(/s$/, "", v); printf "%.2f", v * 1000 }
        else printf "?" }'
}

rows=()     # "label|req/s|p50 ms|p99 ms|cpu us/req|errors"
add_row() { rows+=("$1|$2|$3|$4|$5|$6"); say "$1: $2 req/s, p50 $3 ms, p99 $4 ms, $5 µs CPU/req"; }

run_wrk() { # run_wrk LABEL URL SCRIPT PID...
    local label=$1 url=$2 script=$3; shift 3
    if (( WARMUP > 0 )); then
        wrk -t"$THREADS" -c"$CONNECTIONS" -d"${WARMUP}s" -s "$lua/$script" "$url" -- warmup \
            >/dev/null
    fi
    local before after out
    before=$(cpu_seconds "$@")
    out=$(wrk -t"$THREADS" -c"$CONNECTIONS" -d"${DURATION}s" --latency -s "$lua/$script" "$url")
    after=$(cpu_seconds "$@")
    local requests rps p50 p99 errors cpu
    requests=$(awk '/requests in/ { print $1 }' <<<"$out")
    rps=$(awk '/^Requests\/sec:/ { printf "%.0f", $2 }' <<<"$out")
    p50=$(to_ms "$(awk '$1 == "50%" { print $2 }' <<<"$out")")
    p99=$(to_ms "$(awk '$1 == "99%" { print $2 }' <<<"$out")")
    # Answers with a status of 400 or more, and connect/read/write errors and
    # timeouts ("Socket errors: connect 0, read 0, write 0, timeout 0").
    errors=$(awk '/Non-2xx/ { n += $NF }
        /Socket errors/ { gsub(/[^0-9 ]/, " "); for (i = 1; i <= NF; i++) n += $i }
        END { print n + 0 }' <<<"$out")
    cpu=$(awk -v a="$after" -v b="$before" -v n="$requests" \
        'BEGIN { if (n > 0) printf "%.0f", (a - b) * 1e6 / n; else print "?" }')
    add_row "$label" "$rps" "$p50" "$p99" "$cpu" "$errors"
}

stop() { # stop PID...
    local pid
    for pid in "$@"; do kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; done
}

start_calmkv() { # start_calmkv NAME DURABILITY [ARGS...] → sets $pid and $addr
    local name=$1 durability=$2; shift 2
    mkdir -p "$work/$name"
    RUST_LOG=warn "$calmkv" serve --data-dir "$work/$name/data" --http-addr 127.0.0.1:0 \
        --durability "$durability" --max-connections-per-ip 4096 "$@" \
        >"$work/$name/out" 2>"$work/$name/err" &
    pid=$!
    pids+=("$pid")
    addr=$(wait_for_line "$work/$name/out" "listening on" | sed 's|.*://||')
}

# 1. The do-nothing server.
mkfifo "$work/null.in"
exec 7<>"$work/null.in"
"$load" --serve-null <&7 >"$work/null.out" 2>&1 &
null_pid=$!
pids+=("$null_pid")
null_addr=$(wait_for_line "$work/null.out" "listening on" | sed 's|.*://||')
run_wrk "do-nothing axum server, PUT" "http://$null_addr" put_new.lua "$null_pid"
run_wrk "do-nothing axum server, POST" "http://$null_addr" incr.lua "$null_pid"
run_wrk "do-nothing axum server, GET" "http://$null_addr" get.lua "$null_pid"
stop "$null_pid"

# 2. calmkv, one node.
start_calmkv sync sync
run_wrk "calmkv, 1 node, \`sync\`, PUT" "http://$addr" put_new.lua "$pid"
run_wrk "calmkv, 1 node, \`sync\`, counter incr" "http://$addr" incr.lua "$pid"
run_wrk "calmkv, 1 node, GET" "http://$addr" get.lua "$pid"
stop "$pid"
start_calmkv none none
run_wrk "calmkv, 1 node, \`none\`, PUT" "http://$addr" put_new.lua "$pid"
stop "$pid"

# 3. Redis.
for mode in always everysec; do
    port=$((base_port + 1))
    mkdir -p "$work/redis-$mode"
    redis-server --port "$port" --bind 127.0.0.1 --dir "$work/redis-$mode" --save "" \
        --appendonly yes --appendfsync "$mode" --daemonize no >"$work/redis-$mode/log" 2>&1 &
    redis_pid=$!
    pids+=("$redis_pid")
    for _ in $(seq 100); do redis-cli -p "$port" ping >/dev/null 2>&1 && break; sleep 0.1; done
    if [[ $mode == always ]]; then n=$REDIS_REQUESTS_ALWAYS; else n=$REDIS_REQUESTS_EVERYSEC; fi
    before=$(cpu_seconds "$redis_pid")
    csv=$(redis-benchmark -p "$port" -c "$CONNECTIONS" -n "$n" -d 100 -r 100000 -t set --csv -q)
    after=$(cpu_seconds "$redis_pid")
    # "test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms","p99_latency_ms","max_latency_ms"
    line=$(grep '^"SET' <<<"$csv" | tr -d '"')
    IFS=, read -r _ rps _ _ p50 _ p99 _ <<<"$line"
    cpu=$(awk -v a="$after" -v b="$before" -v n="$n" 'BEGIN { printf "%.0f", (a - b) * 1e6 / n }')
    add_row "Redis SET, \`appendfsync $mode\`" "$(printf '%.0f' "$rps")" "$p50" "$p99" "$cpu" 0
    stop "$redis_pid"
done

# 4. etcd, 3 members, where installed.
if command -v etcd >/dev/null && command -v benchmark >/dev/null; then
    say "etcd is installed, but this script does not drive it yet: skipped"
else
    say "etcd is not installed: its row is skipped"
fi

# 5. calmkv, 3 nodes (w=1).
secret=bench-table-secret-0123456789
cluster=()
for i in 1 2 3; do
    gossip=127.0.0.1:$((base_port + 10 + i))
    peer=127.0.0.1:$((base_port + 20 + i))
    join=()
    if (( i > 1 )); then join=(--join "127.0.0.1:$((base_port + 11))"); fi
    start_calmkv "node$i" sync --gossip-addr "$gossip" --peer-addr "$peer" \
        --cluster-secret "$secret" "${join[@]}"
    cluster+=("$pid")
    eval "addr$i=$addr"
done
for _ in $(seq 300); do
    alive=$(curl -s "http://$addr1/metrics" | awk '$1 == "calmkv_gossip_members_alive" { print $2 }')
    [[ ${alive:-0} == 2 ]] && break
    sleep 0.1
done
if [[ ${alive:-0} != 2 ]]; then say "the 3-node cluster did not form (alive: ${alive:-?})"; fi
run_wrk "calmkv, 3 nodes, \`w=1\`, PUT (CPU: all 3)" "http://$addr1" put_new.lua "${cluster[@]}"
run_wrk "calmkv, 3 nodes, \`w=1\`, counter incr (CPU: all 3)" "http://$addr1" incr.lua \
    "${cluster[@]}"
stop "${cluster[@]}"

# The table.
redis_always=$(printf '%s\n' "${rows[@]}" | awk -F'|' '$1 ~ /appendfsync always/ { print $2 }')
null_for() { # the null server's req/s for the same kind of request
    local kind=PUT
    case $1 in *GET*) kind=GET ;; *incr*|*POST*) kind=POST ;; esac
    printf '%s\n' "${rows[@]}" | awk -F'|' -v k="do-nothing axum server, $kind" '$1 == k { print $2 }'
}
echo
echo "wrk -t$THREADS -c$CONNECTIONS, ${DURATION} s per run after ${WARMUP} s of warm-up;" \
    "redis-benchmark -c $CONNECTIONS -d 100 -r 100000; load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
echo
echo "| target | req/s | p50 | p99 | server CPU / req | vs Redis always | vs do-nothing | errors |"
echo "|---|--:|--:|--:|--:|--:|--:|--:|"
for row in "${rows[@]}"; do
    IFS='|' read -r label rps p50 p99 cpu errors <<<"$row"
    null=$(null_for "$label")
    ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f×", a / b; else print "–" }'; }
    echo "| $label | $rps | $p50 ms | $p99 ms | $cpu µs | $(ratio "$rps" "$redis_always") | $(ratio "$rps" "${null:-0}") | $errors |"
done
