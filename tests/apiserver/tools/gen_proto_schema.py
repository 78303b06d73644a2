#!/usr/bin/env python3
"""Generates src/proto_schema.txt: the protobuf field tables of the
Kubernetes API types, read from the gzipped FileDescriptorProtos that every
Go Kubernetes client (kubectl included) embeds.

    python3 tools/gen_proto_schema.py /usr/bin/kubectl > src/proto_schema.txt

Line format: `<full message name> <field>...`, each field
`<json name>=<number>:<type>[*]` where type is a scalar (string, bytes,
bool, int32, int64, uint32, uint64, double, float) or `.full.MessageName`,
or `map<V>` for map<string, V>; `*` marks repeated fields.
"""
import re
import sys
import zlib

WANTED = (
    "k8s.io/api/core/v1/", "k8s.io/api/apps/v1/", "k8s.io/api/rbac/v1/",
    "k8s.io/api/discovery/v1/", "k8s.io/api/coordination/v1/",
    "k8s.io/api/autoscaling/v1/", "k8s.io/api/authentication/v1/", "k8s.io/api/authorization/v1/", "k8s.io/api/events/v1/",
    "k8s.io/apimachinery/pkg/apis/meta/v1/", "k8s.io/apimachinery/pkg/runtime/generated",
    "k8s.io/apimachinery/pkg/util/intstr/", "k8s.io/apimachinery/pkg/api/resource/",
)

SCALARS = {1: "double", 2: "float", 3: "int64", 4: "uint64", 5: "int32", 6: "uint64", 7: "uint32",
           8: "bool", 9: "string", 12: "bytes", 13: "uint32", 14: "int32", 15: "int32", 16: "int64",
           17: "sint32", 18: "sint64"}


def varint(b, i):
    shift = v = 0
    while True:
        c = b[i]
        i += 1
        v |= (c & 0x7F) << shift
        shift += 7
        if c < 0x80:
            return v, i


def fields(b):
    i = 0
    while i < len(b):
        key, i = varint(b, i)
        num, wt = key >> 3, key & 7
        if wt == 0:
            v, i = varint(b, i)
        elif wt == 2:
            n, i = varint(b, i)
            v = b[i:i + n]
            i += n
        elif wt == 1:
            v = b[i:i + 8]
            i += 8
        elif wt == 5:
            v = b[i:i + 4]
            i += 4
        else:
            raise ValueError(wt)
        yield num, v


def parse_message(b, prefix, out):
    name = ""
    flds = []
    nested = []
    map_entry = False
    for num, v in fields(b):
        if num == 1:
            name = v.decode()
        elif num == 2:
            f = {}
            for fn, fv in fields(v):
                f[fn] = fv
            flds.append(f)
        elif num == 3:
            nested.append(v)
        elif num == 7:
            for on, ov in fields(v):
                if on == 7 and ov:
                    map_entry = True
    full = prefix + "." + name
    out[full] = {"fields": flds, "map_entry": map_entry}
    for n in nested:
        parse_message(n, full, out)


def main():
    data = open(sys.argv[1], "rb").read()
    msgs = {}
    seen = set()
    for m in re.finditer(rb"\x1f\x8b\x08\x00\x00\x00\x00\x00", data):
        try:
            d = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data[m.start():m.start() + 4_000_000])
        except Exception:
            continue
        try:
            parsed = dict()
            fname = pkg = ""
            tops = []
            for num, v in fields(d):
                if num == 1:
                    fname = v.decode()
                elif num == 2:
                    pkg = v.decode()
                elif num == 4:
                    tops.append(v)
        except Exception:
            continue
        if not fname.endswith("generated.proto") or not fname.startswith(WANTED) or fname in seen:
            continue
        seen.add(fname)
        for t in tops:
            parse_message(t, "." + pkg, msgs)
    lines = []
    for full in sorted(msgs):
        info = msgs[full]
        if info["map_entry"]:
            continue
        parts = [full]
        for f in info["fields"]:
            name = f[1].decode()
            num = f[3]
            label = f.get(4, 1)
            typ = f.get(5)
            tname = f.get(6, b"").decode()
            if typ == 11:
                entry = msgs.get(tname)
                if entry and entry["map_entry"]:
                    val = [x for x in entry["fields"] if x[3] == 2][0]
                    vt = SCALARS.get(val.get(5)) or val.get(6, b"").decode()
                    parts.append(f"{name}={num}:map<{vt}>")
                    continue
                t = tname
            else:
                t = SCALARS[typ]
            parts.append(f"{name}={num}:{t}{'*' if label == 3 else ''}")
        lines.append(" ".join(parts))
    sys.stderr.write("files: %s\n" % sorted(seen))
    print("\n".join(lines))


main()
