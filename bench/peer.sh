# Sourced by bench/bench.sh (stage "peer"): measures a peer websocket server beside the gateway
# with the same client and writes its section of the results to $OUT/peer.md.
log "peer: not measured yet"
