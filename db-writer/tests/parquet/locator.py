"""The shard locator (db-writer/src/locator.rs), reimplemented from docs/data.md alone:
SipHash-1-3 with the fixed keys over the key's UTF-8 bytes followed by one 0xff byte, then jump
consistent hash over the number of shards.

Usage: locator.py SHARDS KEY...   prints one JSON object {key: shard}."""

import json
import sys

MASK = (1 << 64) - 1
K0, K1 = 0x6368_6174_2D73_6861, 0x7264_2D6C_6F63_6174


def rotl(x, b):
    return ((x << b) | (x >> (64 - b))) & MASK


def siphash13(k0, k1, data):
    v0 = k0 ^ 0x736F6D6570736575
    v1 = k1 ^ 0x646F72616E646F6D
    v2 = k0 ^ 0x6C7967656E657261
    v3 = k1 ^ 0x7465646279746573

    def sipround():
        nonlocal v0, v1, v2, v3
        v0 = (v0 + v1) & MASK
        v1 = rotl(v1, 13) ^ v0
        v0 = rotl(v0, 32)
        v2 = (v2 + v3) & MASK
        v3 = rotl(v3, 16) ^ v2
        v0 = (v0 + v3) & MASK
        v3 = rotl(v3, 21) ^ v0
        v2 = (v2 + v1) & MASK
        v1 = rotl(v1, 17) ^ v2
        v2 = rotl(v2, 32)

    full = len(data) - len(data) % 8
    for i in range(0, full, 8):
        m = int.from_bytes(data[i : i + 8], "little")
        v3 ^= m
        sipround()
        v0 ^= m
    m = int.from_bytes(data[full:], "little") | ((len(data) & 0xFF) << 56)
    v3 ^= m
    sipround()
    v0 ^= m
    v2 ^= 0xFF
    for _ in range(3):
        sipround()
    return v0 ^ v1 ^ v2 ^ v3


def jump(h, shards):
    b, j = -1, 0
    while j < shards:
        b = j
        h = (h * 2862933555777941757 + 1) & MASK
        j = int(float(b + 1) * (float(1 << 31) / float((h >> 33) + 1)))
    return b


def shard_of(key, shards):
    return jump(siphash13(K0, K1, key.encode("utf-8") + b"\xff"), shards)


if __name__ == "__main__":
    n = int(sys.argv[1])
    print(json.dumps({k: shard_of(k, n) for k in sys.argv[2:]}))
