#!/usr/bin/env python3
"""Checks that a lab made by scripts/netlab behaves as its gateway kinds say (`scripts/netlab check`).

For each site, from the cloud host and from the other site:
- the site's host reaches the cloud (198.18.0.10 and .11) over TCP;
- a SYN from the cloud to the site's public address: public -> accepted by the host itself;
  masq, random, firewall -> dropped silently (the connect times out); masq-rst -> refused (RST);
- masq and masq-rst keep the source port in their mapping; random changes it;
- a firewall site reaches nothing but the cloud (its SYN to the other site's public address is dropped);
- the sites are a routed hop apart: a SYN from site A with a TTL just large enough to leave its own NAT
  (2 behind a gateway, 1 when public) dies at the router: silently (the connect times out), or with
  --router-icmp, answered by an ICMP time exceeded ("no route to host").
Prints one line per check and `N passed, N failed`; exits 1 when any failed. Every wait is bounded.
"""
import os, subprocess, sys

SERVER = r'''
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(8); print("ready", flush=True)
s.settimeout(20)
while True:
    try: c, peer = s.accept()
    except socket.timeout: break
    c.sendall(("%s:%d\n" % peer).encode()); c.close()
'''
CLIENT = r'''
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
if len(sys.argv) > 3 and int(sys.argv[3]): s.bind(("0.0.0.0", int(sys.argv[3])))
if len(sys.argv) > 5: s.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, int(sys.argv[5]))
s.settimeout(float(sys.argv[4]) if len(sys.argv) > 4 else 3)
try:
    s.connect((sys.argv[1], int(sys.argv[2]))); print("ok " + s.recv(100).decode().strip())
except socket.timeout: print("timeout")
except ConnectionRefusedError: print("refused")
except OSError as e: print("error " + str(e))
'''


def load(path):
    env = {}
    for line in open(path):
        k, _, v = line.strip().partition("=")
        if k: env[k] = v
    return env


class Server:
    def __init__(self, ns, ip, port):
        self.p = subprocess.Popen(["ip", "netns", "exec", ns, "python3", "-c", SERVER, ip, str(port)],
                                  stdout=subprocess.PIPE, text=True)
        line = self.p.stdout.readline()  # bounded by the server's own start
        if "ready" not in line:
            raise SystemExit(f"netlab check: could not start a listener in {ns} on {ip}:{port}")

    def stop(self):
        self.p.kill(); self.p.wait()


def connect(ns, ip, port, src_port=None, timeout=3, ttl=None):
    args = ["ip", "netns", "exec", ns, "python3", "-c", CLIENT, ip, str(port)]
    args += [str(src_port or 0), str(timeout)] + ([str(ttl)] if ttl else [])
    out = subprocess.run(args, capture_output=True, text=True, timeout=timeout + 30).stdout.strip()
    return out


def main():
    env = load(sys.argv[1])
    passed = failed = 0

    def check(what, ok, got):
        nonlocal passed, failed
        print(f"{'ok  ' if ok else 'FAIL'} {what}: {got}")
        if ok: passed += 1
        else: failed += 1

    cloud = env["NETLAB_CLOUD_NS"]
    servers = [Server(cloud, env["NETLAB_CLOUD_IP"], 9100), Server(cloud, env["NETLAB_CLOUD_IP2"], 9100)]
    for site, other in (("A", "B"), ("B", "A")):
        ns, kind = env[f"NETLAB_{site}_NS"], env[f"NETLAB_{site}_KIND"]
        for ip in (env["NETLAB_CLOUD_IP"], env["NETLAB_CLOUD_IP2"]):
            got = connect(ns, ip, 9100, src_port=41000 + ord(site))
            check(f"site {site} ({kind}) reaches the cloud at {ip}", got.startswith("ok"), got)
            if got.startswith("ok") and kind in ("masq", "masq-rst", "random"):
                port = int(got.split(":")[-1])
                keep = kind != "random"
                check(f"site {site} ({kind}) {'keeps' if keep else 'changes'} the source port",
                      (port == 41000 + ord(site)) == keep, f"41{ord(site):03d} mapped to {port}")
        listener = Server(ns, env[f"NETLAB_{site}_IP"], 9200)
        got = connect(cloud, env[f"NETLAB_{site}_PUBLIC_IP"], 9200, timeout=2)
        want = {"public": "ok", "masq-rst": "refused"}.get(kind, "timeout")
        check(f"an unsolicited SYN from the cloud to site {site} ({kind}) is {want}", got.startswith(want), got)
        listener.stop()
        if kind == "firewall":
            got = connect(ns, env[f"NETLAB_{other}_PUBLIC_IP"], 9300, timeout=2)
            check(f"firewall site {site} cannot reach site {other}'s public address", got == "timeout", got)
    if env["NETLAB_A_KIND"] != "firewall":
        ttl = 1 if env["NETLAB_A_KIND"] == "public" else 2
        got = connect(env["NETLAB_A_NS"], env["NETLAB_B_PUBLIC_IP"], 9300, timeout=2, ttl=ttl)
        icmp = env.get("NETLAB_ROUTER_ICMP") == "1"
        want = "No route" if icmp else "timeout"
        check(f"a SYN with TTL {ttl} from site A dies at the router before site B's address "
              f"({'ICMP time exceeded' if icmp else 'silently'})", want in got, got)
    for s in servers: s.stop()
    print(f"{passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
