#!/usr/bin/env python3
"""Writes the hand-made seed inputs of every fuzz target into
fuzz/seeds/<target>/ (not committed: the committed corpora in
fuzz/corpus/<target>/ were grown from these by fuzzing and minimised).
The layouts follow the targets' own documentation in fuzz_targets/.

    python3 fuzz/seeds.py
"""

import base64
import os
import struct

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "seeds")


def write(target, name, data):
    d = os.path.join(ROOT, target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def csum(data):
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def ip4(a):
    return bytes(int(x) for x in a.split("."))


def ip6(last):
    return bytes.fromhex("fd000064000000000000000000000000")[:15] + bytes([last])


def tcp(src, dst, sport, dport, seq=1000, ack=0, flags=0x02, payload=b"", mss=1360, v6=False):
    opts = struct.pack("!BBH", 2, 4, mss) if flags & 0x02 else b""
    off = (20 + len(opts)) // 4
    hdr = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, off << 4, flags, 65535, 0, 0) + opts
    seg = hdr + payload
    if v6:
        pseudo = src + dst + struct.pack("!I3xB", len(seg), 6)
    else:
        pseudo = src + dst + struct.pack("!BBH", 0, 6, len(seg))
    c = csum(pseudo + seg)
    seg = seg[:16] + struct.pack("!H", c) + seg[18:]
    return ip(src, dst, 6, seg, v6)


def udp(src, dst, sport, dport, payload, v6=False):
    seg = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    if v6:
        pseudo = src + dst + struct.pack("!I3xB", len(seg), 17)
    else:
        pseudo = src + dst + struct.pack("!BBH", 0, 17, len(seg))
    c = csum(pseudo + seg) or 0xFFFF
    seg = seg[:6] + struct.pack("!H", c) + seg[8:]
    return ip(src, dst, 17, seg, v6)


def ip(src, dst, proto, payload, v6=False):
    if v6:
        return struct.pack("!IHBB", 6 << 28, len(payload), proto, 64) + src + dst + payload
    h = struct.pack("!BBHHHBBH", 0x45, 0, 20 + len(payload), 1, 0, 64, proto, 0) + src + dst
    h = h[:10] + struct.pack("!H", csum(h)) + h[12:]
    return h + payload


def piece(b):
    return struct.pack("!H", len(b)) + b


LAPTOP = ip4("100.64.0.2")
SVC = ip4("10.96.0.1")


# ---- wg_datagram -----------------------------------------------------------

def wg_seeds():
    t = "wg_datagram"
    data = struct.pack("<I", 4) + struct.pack("<I", 0) + bytes(8) + bytes(32)
    init = struct.pack("<I", 1) + bytes(144)
    resp = struct.pack("<I", 2) + bytes(88)
    cookie = struct.pack("<I", 3) + bytes(60)
    packet = udp(SVC, LAPTOP, 53, 40000, b"answer")
    raw = b"\x00"
    for op, d in [(0x00, data), (0x11, init), (0x22, resp), (0x33, cookie), (0x40, data), (0x50, b"\x04")]:
        raw += bytes([op]) + piece(d)
    raw += b"\x0a" + b"\x0b" + piece(packet) + b"\x0c" + b"\x09" + piece(data) + struct.pack("!H", 64)
    write(t, "raw", raw)
    frames = b"".join(piece(d) for d in [data, init, cookie])
    write(t, "framed", b"\x01" + struct.pack("!H", 2048) + b"\x03\x01\x05\x40" + b"\x00" + frames)
    write(t, "framed-zero", b"\x01\xff\xff\x00\x07\x01" + piece(data) + b"\x00\x00")
    s = b"\x02"
    s += b"\x01\x00" + piece(udp(LAPTOP, SVC, 40000, 53, b"query"))
    s += b"\x02\x01" + piece(tcp(ip6(2), ip6(9), 40000, 80, v6=True))
    s += b"\x11\x00" + piece(tcp(LAPTOP, SVC, 40000, 80))
    s += b"\x09\x02" + piece(udp(LAPTOP, ip4("100.64.0.3"), 1, 2, b"to B"))
    s += b"\x05\x00" + piece(udp(ip4("100.64.0.3"), SVC, 1, 2, b"forged")) + b"\x00\x10\x01"
    s += b"\x00\x03" + piece(b"")
    write(t, "session", s)
    write(t, "handshake", b"\x03" + b"\x00\x00" + bytes(144) + b"\x04\x03" + bytes(88) + b"\x01")


# ---- flow_ingress ----------------------------------------------------------

def flow_seeds():
    t = "flow_ingress"
    FIX = 0x01 | 0x02
    ACK = FIX | 0x04 | 0x08

    def pkt(flags, p, extra=b""):
        return b"\x00" + bytes([flags]) + piece(p) + extra

    syn = tcp(LAPTOP, SVC, 40000, 80)
    s = b"\x00\x00"
    s += pkt(FIX, syn, b"\x00")  # accept
    s += b"\x07"  # egress: SYN-ACK
    s += pkt(ACK, tcp(LAPTOP, SVC, 40000, 80, flags=0x10))
    s += pkt(ACK, tcp(LAPTOP, SVC, 40000, 80, flags=0x18, payload=b"GET / HTTP/1.1\r\n\r\n"))
    s += b"\x07"
    s += b"\x0a\x00\x01\x10\x00"  # read up to 4096
    s += b"\x0a\x00\x00" + piece(b"HTTP/1.1 200 OK\r\n\r\n")  # send
    s += b"\x07"
    s += pkt(ACK, tcp(LAPTOP, SVC, 40000, 80, flags=0x11))  # FIN
    s += b"\x0a\x00\x05"  # close
    s += b"\x07\x09\xff\xff\x07"
    write(t, "tcp-exchange", s)
    s = b"\x05\x81" + pkt(FIX, syn, b"\x02") + b"\x07" + pkt(FIX, syn, b"\x03") + pkt(FIX, tcp(LAPTOP, SVC, 40001, 80), b"\x01")
    s += b"\x07\x0a\x00\x06\x07\x0a\x00\x07\x0e\x01\x0e\x02\x0e\x03\x0e\x04"
    write(t, "tcp-refuse-abort", s)
    s = b"\x12\xa3" + pkt(FIX, udp(LAPTOP, SVC, 5353, 53, b"\x12\x34query"), b"\x01")
    s += pkt(FIX, udp(ip6(2), ip6(10), 5353, 53, b"v6 query", v6=True), b"\x01")
    s += b"\x07\x09\x00\x40\x0e\x00\x0a\x00\x08" + piece(b"late reply") + b"\x07"
    write(t, "udp", s)
    s = b"\x00\x00" + b"\x0d\x00\x1f\x90" + b"\x07"  # connect to 100.64.0.2:8080
    s += pkt(0x20 | ACK, tcp(LAPTOP, SVC, 1, 1, flags=0x12))  # SYN-ACK reversed
    s += b"\x07\x0a\x00\x00" + piece(b"hello laptop") + b"\x07"
    write(t, "connect", s)
    s = b"\x03\x00" + pkt(0x10 | FIX, tcp(LAPTOP, SVC, 40002, 443, mss=1460), b"\x05\x00\x00")
    s += pkt(0, ip(LAPTOP, SVC, 1, b"\x08\x00\x00\x00"))
    s += pkt(0, syn[:30]) + pkt(FIX, tcp(ip6(2), ip6(10), 40000, 80, v6=True), b"\x00") + b"\x07"
    write(t, "mss-icmp-v6", s)


# ---- dns_query -------------------------------------------------------------

TYPES = {"A": 1, "NS": 2, "CNAME": 5, "SOA": 6, "PTR": 12, "MX": 15, "TXT": 16,
         "AAAA": 28, "SRV": 33, "OPT": 41, "AXFR": 252, "ANY": 255}


def qname(name):
    out = b""
    for label in name.strip(".").split("."):
        if label:
            out += bytes([len(label)]) + label.encode()
    return out + b"\0"


def dns(name, qtype="A", qid=0x1234, edns=False, opcode=0, extra_q=None, qclass=1):
    qd = 2 if extra_q else 1
    ar = 1 if edns else 0
    m = struct.pack("!HHHHHH", qid, 0x0100 | (opcode << 11), qd, 0, 0, ar)
    m += qname(name) + struct.pack("!HH", TYPES[qtype], qclass)
    if extra_q:
        m += qname(extra_q) + struct.pack("!HH", 1, 1)
    if edns:
        m += b"\0" + struct.pack("!HHIH", 41, 1232, 0, 0)
    return m


def dns_seeds():
    t = "dns_query"

    def q(op, m):
        return bytes([op]) + piece(m)

    s = b"\x00"
    s += q(0, dns("web.default.", edns=True))
    s += q(0, dns("web.default.", qid=0x4321, edns=True))  # encoded-answer hit
    s += q(8, dns("web.default."))  # TCP
    s += b"\xe0\x10\x00"  # time passes
    s += q(0, dns("web.default.", qid=7, edns=True))
    write(t, "cache", s)
    s = b"\x00"
    for name, qtype in [("web.", "AAAA"), ("v6.default.", "AAAA"), ("big.default.", "A"),
                        ("_http._tcp.echo.default.svc.cluster.local.", "SRV"),
                        ("30.0.96.10.in-addr.arpa.", "PTR"), ("nxthing.default.svc.cluster.local.", "A"),
                        ("example.com.", "TXT"), ("cname.default.", "A"), ("wiki.", "A"),
                        ("failing.data.", "A"), ("error.example.", "MX"), ("x.y.", "A"),
                        ("1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.d.f.ip6.arpa.", "PTR")]:
        s += q(0, dns(name, qtype))
    s += q(8, dns("big.default.", "A"))
    s += q(3, dns("big.default.", "A", edns=True))
    write(t, "routes", s)
    s = b"\x06"
    s += q(0, dns("web.", "ANY")) + q(0, dns("web.", "AXFR")) + q(0, dns("web.", "OPT"))
    s += q(0, dns("web.", opcode=2)) + q(0, dns("web.", extra_q="two.")) + q(0, dns("web.", qclass=3))
    s += q(4, dns("web.")) + q(5, dns("web.")) + q(6, dns("web.")) + q(2, dns("web.")) + q(1, dns("web."))
    s += q(0, b"\x12\x34\x81\x00") + q(0, b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x03abc")
    s += q(0x10, dns("web.data.")) + q(0x14, dns("web.data."))
    write(t, "refusals", s)


# ---- control_api -----------------------------------------------------------

KEY = base64.b64encode(bytes(range(32))).decode()


def api_seeds():
    t = "control_api"
    nonce = base64.b64encode(struct.pack("!Q", 1800000000) + bytes(16)).decode()
    write(t, "register", '{"public_key":"%s","name":"alice@laptop","previous_address":"198.19.0.7",'
          '"nonce":"%s","proof":"%s"}' % (KEY, nonce, KEY))
    write(t, "register-min", '{"public_key":"%s","name":"bob","nonce":"","proof":""}' % KEY.replace("+", "-"))
    write(t, "reroute", '{"namespace":"default","service":"web","ports":[{"name":"http","port":80},'
          '{"name":"","port":8443}],"port":80,"laptop_port":8080,"protocol":"http",'
          '"header":["x-user","alice"],"force":true}')
    write(t, "reroute-tcp", '{"namespace":"data","service":"redis","ports":[{"name":"","port":6379}],'
          '"port":6379,"laptop_port":6379}')
    write(t, "stop", '{"namespace":"default","service":"web","port":80}')
    write(t, "stop-all", '{}')
    write(t, "bad-names", '{"namespace":"Default_NS","service":"-web.","ports":[{"name":"a--b","port":0}],'
          '"port":0,"laptop_port":0,"header":["",""]}')
    write(t, "escapes", '{"public_key":"\\u0000\\ud83d\\ude00","name":"\\"\\\\","namespace":null}')
    write(t, "record", '{"key":"%s","laptop":"alice@laptop"}' % KEY)
    write(t, "saved", '{"originalSelector":{"app":"web"},"by":"alice"}')
    write(t, "grant", '{"listeners":[[{"name":"http","port":80},40123]],"lease_secs":12,"took_over_from":"bob"}')
    write(t, "name", "echo-service-with-a-rather-long-name-for-shadow")
    write(t, "header", "x-burrow-user:alice smith")


# ---- wgconf ----------------------------------------------------------------

PRIV = base64.b64encode(bytes([1] * 32)).decode()
PUB_A = "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk="
PUB_B = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg="


def wgconf_seeds():
    t = "wgconf"
    write(t, "gateway", f"""[Interface]
PrivateKey = {PRIV}
ListenPort = 51820

[Peer]
PublicKey = {PUB_A}
AllowedIPs = 100.64.0.2/32
PresharedKey = {PRIV}
PersistentKeepalive = 25

[Peer]
PublicKey = {PUB_B}
AllowedIPs = fd00:64::3
""")
    write(t, "client", f"""# wg-quick style
[Interface]
PrivateKey = {PRIV}
Address = 100.64.0.2/32, fd00:64::2/128
MTU = 1420
DNS = 10.96.0.10
Table = off
PostUp = iptables -A FORWARD
SaveConfig = true

[Peer]
PublicKey = {PUB_A}
Endpoint = gateway.example:51820
AllowedIPs = 10.96.0.0/12, 10.244.0.0/16
AllowedIPs = fd00::/64
PersistentKeepalive = off

[peer]
publickey = {PUB_B}
endpoint = [2001:db8::1]:51820
allowedips = 10.1.2.3/8
""")
    write(t, "errors", f"""[Interface]
PrivateKey = {PRIV}
[Interface]
[Peer]
PublicKey = short
Endpoint = 1.2.3.4
MTU = 100
AllowedIPs = 10.0.0.0/33
""")
    write(t, "key", PUB_A)


if __name__ == "__main__":
    wg_seeds()
    flow_seeds()
    dns_seeds()
    api_seeds()
    wgconf_seeds()
    print("seeds written under", ROOT)
