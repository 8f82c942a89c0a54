# Shared by scripts/bench-pull and scripts/bench-cold-blob (sourced, not run): an upstream
# Distribution registry on loopback, pushing blobs into it, and the hashing client.
# Expects $work (a scratch directory) to be set.

# Waits up to 10 s for URL to answer.
wait_for() {
  local _
  for _ in $(seq 100); do curl -sf -o /dev/null "$1" && return 0; sleep 0.1; done
  echo "$0: $1 did not come up" >&2
  exit 1
}

# Starts the upstream registry on 127.0.0.1:PORT, storage in $work/up; sets $up to its URL.
start_upstream() {
  up="http://127.0.0.1:$1"
  cat > "$work/up.yml" <<YML
version: 0.1
storage: {filesystem: {rootdirectory: $work/up}}
http: {addr: 127.0.0.1:$1}
log: {level: error}
YML
  docker-registry serve "$work/up.yml" > "$work/up.log" 2>&1 &
  wait_for "$up/v2/"
}

# Pushes FILE to REPOSITORY on the upstream as a blob; prints its digest.
push_blob() { # REPOSITORY FILE
  local hex loc
  hex=$(openssl dgst -sha256 -r "$2" | cut -c1-64)
  loc=$(curl -sfi -X POST "$up/v2/$1/blobs/uploads/" | tr -d '\r' | awk 'tolower($1)=="location:"{print $2}')
  case $loc in http*) ;; *) loc="$up$loc" ;; esac
  # Streamed from the file (-T): --data-binary would hold all of it in memory.
  curl -sf -o /dev/null -X PUT "$loc&digest=sha256:$hex" -T "$2" \
    -H 'Content-Type: application/octet-stream'
  echo "sha256:$hex"
}

# "median (min–max)" of the numbers given, to two decimals.
median_range() { # VALUES...
  printf '%s\n' "$@" | sort -g |
    awk '{v[NR]=$1} END {m=(NR%2)?v[(NR+1)/2]:(v[NR/2]+v[NR/2+1])/2; printf "%.2f (%.2f–%.2f)", m, v[1], v[NR]}'
}

# Seconds taken by GET URL with curl piped into openssl's SHA-256 (a client that hashes
# what it receives, as containerd does); fails unless the bytes hash to HEX.
hashed_get() { # URL HEX
  local s e got
  s=$(date +%s.%N)
  got=$(curl -sf "$1" | openssl dgst -sha256 -r | cut -c1-64)
  e=$(date +%s.%N)
  [ "$got" = "$2" ] || { echo "$0: wrong bytes from $1" >&2; exit 1; }
  echo "$e - $s" | bc
}
