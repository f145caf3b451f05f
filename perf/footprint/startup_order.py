#!/usr/bin/env python3
"""Regenerates Sources/mesh-agent/link/startup.order: the functions mesh-agent runs from exec until it is
ready and idle (first), then those it runs serving a few services (DNS, HTTP through a VIP, the admin API,
a watch update, twin reports), so that the release link (lld --symbol-ordering-file) puts them next to
each other and the idle agent maps ~5 MB of its text instead of ~12 MB (Sources/mesh-agent/link/README.md).

  perf/footprint/startup_order.py [--bin perf/.build/release] [--out Sources/mesh-agent/link/startup.order]
  perf/footprint/startup_order.py --native-faults     # after relinking: add what valgrind could not run
                                                      # and a restart with the control plane down

Runs a release mesh-agent (debug info stripped: valgrind 3.19 cannot read DWARF 5) under valgrind's
callgrind against a real mesh-control on loopback (the agent joins with a token, HTTPS with client
certificates) and a mosquitto, with one Device (a thermostat twin) and one Workload (a `sleep`) on its node
(the edge part perf/edge-twins measures); dumps the profile once the agent is ready, has synced both and is
idle (one heartbeat), and again after the traffic and 100 updates of the thermostat mapper (built beside
it); then restarts it with its certificate and an empty table and profiles that start-up and idle too;
maps every executed instruction to the symbol of its function (callgrind's own function names miss some).
Needs valgrind (apt-get install valgrind) and mosquitto; --native-faults needs perf. Bounded: every wait has
a deadline, all traffic stays on 127.0.0.1.
"""
import argparse, bisect, glob, http.client, http.server, json, os, re, shutil, signal, socket, struct
import subprocess, sys, tempfile, threading, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import footprint  # noqa: E402  (the control API's HTTPS with the admin certificate)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# free_port, wait_until and stop_all are footprint's (its timeout raises RuntimeError naming what it waited for).
free_port = footprint.free_port
wait_until = footprint.wait_until


def request(port, method, path, body=None, host="127.0.0.1"):
    # The control API is HTTPS with the admin certificate (footprint.CONTROL_PKI), the rest plain HTTP.
    c = footprint.connect(port) if host == "127.0.0.1" else http.client.HTTPConnection(host, port, timeout=30)
    c.request(method, path, body=body, headers={"Content-Type": "application/json"} if body else {})
    r = c.getresponse()
    data = r.read()
    c.close()
    return r.status, data


def dns_query(port, name, qtype, tcp=False):
    q = struct.pack(">HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0)
    for label in name.rstrip(".").split("."):
        q += bytes([len(label)]) + label.encode()
    q += b"\0" + struct.pack(">HH", qtype, 1)
    if tcp:
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.sendall(struct.pack(">H", len(q)) + q)
        s.recv(4096)
    else:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(10)
        s.sendto(q, ("127.0.0.1", port))
        s.recv(4096)
    s.close()


class Backend(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = b"x" * 100
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


def executed_functions(path, obj_suffix, syms, starts, names):
    """Symbols of the functions of `obj_suffix` that ran in the callgrind dump `path` (--dump-instr=yes):
    callgrind's function names that are symbols of the binary, plus the function holding each executed
    instruction (positions: absolute 0x..., relative +n/-n or *, per the callgrind format)."""
    obs, found, cur, last = {}, set(), None, 0
    for line in open(path, errors="replace"):
        line = line.rstrip("\n")
        if not line or line.startswith("calls="):
            continue
        if line[0].isalpha():
            m = re.match(r"(c?ob)=\((\d+)\)(?: (.*))?$", line)
            if m:
                if m.group(3):
                    obs[m.group(2)] = m.group(3)
                if m.group(1) == "ob":
                    cur = obs.get(m.group(2), "")
                continue
            m = re.match(r"c?fn=\(\d+\) (.*)$", line)
            if m:
                name = re.sub(r"'\d+$", "", m.group(1))
                if name in names:
                    found.add(name)
            continue
        tok = line.split(" ", 1)[0]
        if tok.startswith("0x"):
            last = int(tok, 16)
        elif tok[0] in "+-":
            last += int(tok)
        elif tok != "*":
            continue
        if cur and cur.endswith(obj_suffix):
            i = bisect.bisect_right(starts, last) - 1
            if i >= 0 and syms[i][0] <= last < syms[i][0] + max(syms[i][1], 1):
                found.add(syms[i][2])
    return found


EDGE = "/apis/mesh.edge/v1/namespaces/default"


def put_edge(cport, node):
    """The node agent's edge part, as perf/edge-twins runs it: a thermostat DeviceModel, one Device on this
    node (its twin synced and published over MQTT) and one Workload (a supervised `sleep`)."""
    model = {"apiVersion": "mesh.edge/v1", "kind": "DeviceModel", "metadata": {"name": "thermostat"},
             "spec": {"properties": [
                 {"name": "temperature", "type": "float", "minimum": -40, "maximum": 125, "accessMode": "ReadOnly"},
                 {"name": "target", "type": "float", "minimum": 5, "maximum": 35},
                 {"name": "mode", "type": "string", "enum": ["heat", "cool", "off"]}]}}
    device = {"apiVersion": "mesh.edge/v1", "kind": "Device", "metadata": {"name": "thermostat-1"},
              "spec": {"model": "thermostat", "node": node, "protocol": {"name": "mqtt"},
                       "properties": [{"name": "target", "desired": "21.0"}, {"name": "mode", "desired": "heat"}]}}
    workload = {"apiVersion": "mesh.edge/v1", "kind": "Workload", "metadata": {"name": "sleeper-1"},
                "spec": {"command": "sleep", "args": ["3600"], "nodeSelector": {"nodeNames": [node]}}}
    request(cport, "PUT", f"{EDGE}/devicemodels/thermostat", json.dumps(model))
    request(cport, "PUT", f"{EDGE}/devices/thermostat-1", json.dumps(device))
    request(cport, "PUT", f"{EDGE}/workloads/sleeper-1", json.dumps(workload))


def edge_synced(aport):
    twins = json.loads(request(aport, "GET", "/twins")[1])["items"]
    running = [w for w in json.loads(request(aport, "GET", "/workloads")[1])["items"]
               if w["instance"]["phase"] == "Running"]
    return len(twins) == 1 and len(running) == 1


def mapper_reports(binary, mqtt, cport, n):
    """The thermostat mapper publishes n updates; waits until the control plane has the last of them."""
    subprocess.run([binary, "--device", "thermostat-1", "--broker", f"127.0.0.1:{mqtt}", "--interval", "0",
                    "--count", str(n)], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   timeout=300)

    def done():
        d = json.loads(request(cport, "GET", f"{EDGE}/devices/thermostat-1")[1])
        return any(t["name"] == "temperature" and t.get("reportedVersion", 0) >= n
                   for t in d.get("status", {}).get("twins", []))
    wait_until(done, 300, f"{n} mapper reports in the control plane")


def put_service(cport, name, bport):
    """Service `name` in namespace ns: HTTP on port 80 and TCP on 81, one endpoint (the backend at bport)."""
    svc = {"apiVersion": "mesh.edge/v1", "kind": "Service", "metadata": {"name": name, "namespace": "ns"},
           "spec": {"ports": [{"name": "http", "port": 80, "protocol": "HTTP"},
                              {"name": "tcp", "port": 81, "protocol": "TCP"}]}}
    eps = {"apiVersion": "mesh.edge/v1", "kind": "Endpoints", "metadata": {"name": name, "namespace": "ns"},
           "spec": {"addresses": [{"ip": "127.0.0.1", "ports": [{"name": "http", "port": bport},
                                                                 {"name": "tcp", "port": bport}],
                                   "site": "a"}]}}
    request(cport, "PUT", f"/apis/mesh.edge/v1/namespaces/ns/services/{name}", json.dumps(svc))
    request(cport, "PUT", f"/apis/mesh.edge/v1/namespaces/ns/endpoints/{name}", json.dumps(eps))


def routes_listening(aport, n):
    r = json.loads(request(aport, "GET", "/routes")[1])
    return sum(1 for x in r["dataPlane"]["routes"] if x["listening"]) >= n


def native_faults(agent_args, join, work, aport, syms, starts, procs, control, cport, bport, reports):
    """Functions of the linked agent whose instruction fetches page-faulted when run natively: a join start,
    a restart with its certificate, each until ready and idle; then, with one HTTP service in its table
    (added after the second idle, not profiled), a restart from its cache with the control plane down, until
    the route listens and idle (what footprint.py measures as "RSS after that restart": the cache loaded,
    a listener, connects to the control plane refused and retried)."""
    found = set()
    # vaddr - file offset of the executable segment (lld: one page apart).
    delta = 0
    for line in subprocess.run(["readelf", "-lW", agent_args[0]], capture_output=True, text=True).stdout.splitlines():
        p = line.split()
        if p[:1] == ["LOAD"] and "E" in p[-2]:
            delta = int(p[2], 16) - int(p[1], 16)
    for n, extra in enumerate((join, [], [])):
        if n == 2:
            control.send_signal(signal.SIGTERM)
            control.wait(30)
        data = f"{work}/faults{n}.data"
        perf = subprocess.Popen(["perf", "record", "-q", "-e", "page-faults", "-c", "1", "-d", "-k", "CLOCK_MONOTONIC",
                                 "-o", data]
                                + agent_args + extra, stderr=subprocess.DEVNULL)
        procs.append(perf)
        wait_until(lambda: request(aport, "GET", "/readyz")[0] == 200, 60, "mesh-agent ready (under perf)")
        if n < 2:  # (the control plane is down for the third start: nothing to sync)
            wait_until(lambda: edge_synced(aport), 60, "the device and the workload (under perf)")
        if n == 0:
            reports()  # what perf/edge-twins measures after: the mapper's reports went through
        if n == 2:
            wait_until(lambda: routes_listening(aport, 1), 60, "the route from the cache (under perf)")
        time.sleep(25)
        idle_end = time.clock_gettime(time.CLOCK_MONOTONIC)  # not what follows
        if n == 1:
            put_service(cport, "s0", bport)
            wait_until(lambda: routes_listening(aport, 1), 60, "the route (under perf)")
        for pid in subprocess.run(["pgrep", "-P", str(perf.pid)], capture_output=True, text=True).stdout.split():
            os.kill(int(pid), signal.SIGTERM)
        perf.wait(60)
        # Faults on instruction fetch: data address == instruction address.
        lines = subprocess.run(["perf", "script", "-i", data, "-F", "time,addr,ip,dso", "--show-mmap-events"],
                               capture_output=True, text=True).stdout.splitlines()
        base = None
        for line in lines:
            m = re.search(r"PERF_RECORD_MMAP2? \d+/\d+: \[0x([0-9a-f]+)\(0x[0-9a-f]+\) @ (0x[0-9a-f]+|0) .*\]: "
                          r"r-xp .*/mesh-agent$", line)
            if m:
                base = int(m.group(1), 16) - int(m.group(2), 16) - delta
                continue
            p = line.split()  # time: addr (its dso) ip (its dso)
            if base is None or len(p) != 5 or "PERF_RECORD" in line or not p[4].endswith("mesh-agent)"):
                continue
            addr, ip = int(p[1], 16), int(p[3], 16)
            if addr == ip and float(p[0].rstrip(":")) < idle_end:
                va = addr - base
                i = bisect.bisect_right(starts, va) - 1
                if i >= 0 and syms[i][0] <= va < syms[i][0] + max(syms[i][1], 1):
                    found.add(syms[i][2])
    return found


def merge_order(path, faults):
    """Adds `faults` not listed yet to the start-up part (before `# serving`) of the order file."""
    lines = open(path).read().splitlines()
    at = lines.index("# serving")
    listed = set(x for x in lines if not x.startswith("#"))
    new = sorted(faults - listed)
    lines[at:at] = new
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"startup_order: {len(new)} functions added to the start-up part of {path}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default=os.path.join(ROOT, "perf", ".build", "release"),
                    help="folder with release mesh-agent and mesh-control")
    ap.add_argument("--out", default=os.path.join(ROOT, "Sources", "mesh-agent", "link", "startup.order"))
    ap.add_argument("--idle-seconds", type=float, default=25, help="idle time profiled after ready")
    ap.add_argument("--native-faults", action="store_true",
                    help="instead: run the linked agent natively under `perf record -e page-faults` (join, idle, "
                         "restart, idle) and add the functions whose first instruction fetch faulted that --out "
                         "does not list yet to its start-up part (code valgrind cannot run: BoringSSL's AVX-512 "
                         "and ADX paths); relink and repeat until it adds next to nothing")
    a = ap.parse_args()
    if not shutil.which("valgrind"):
        raise SystemExit("startup_order: valgrind is not installed (apt-get install valgrind)")
    work = tempfile.mkdtemp(prefix="mesh-order-")
    agent_bin = os.path.join(work, "mesh-agent")
    subprocess.run(["strip", "-g", "-o", agent_bin, os.path.join(a.bin, "mesh-agent")], check=True)
    syms = []
    for line in subprocess.run(["nm", "-n", "-S", "--defined-only", agent_bin], capture_output=True,
                               text=True, check=True).stdout.splitlines():
        p = line.split()
        if len(p) == 4 and p[2] in "tTwW":
            syms.append((int(p[0], 16), int(p[1], 16), p[3]))
    starts = [s[0] for s in syms]
    names = {s[2] for s in syms}
    cport, aport, dport = free_port(), free_port(), free_port()
    with open(f"{work}/control.yaml", "w") as f:
        f.write(f"listen: 127.0.0.1:{cport}\ndataDir: {work}/control\nserviceCIDRs: [127.64.0.0/10]\n"
                f"durability: normal\nlogLevel: warning\n")
    procs = []
    backend = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Backend)
    threading.Thread(target=backend.serve_forever, daemon=True).start()
    try:
        footprint.CONTROL_PKI[cport] = f"{work}/control/pki"
        control = subprocess.Popen([os.path.join(a.bin, "mesh-control"), "--config", f"{work}/control.yaml"])
        procs.append(control)
        wait_until(lambda: os.path.exists(f"{work}/control/admin.meshconfig")
                   and request(cport, "GET", "/readyz")[0] == 200, 30, "mesh-control")
        # The agent joins with a one-use token (TLS with a client certificate from then on), as it ships.
        token = json.loads(request(cport, "POST", "/apis/mesh.edge/v1/bootstraptokens", json.dumps(
            {"apiVersion": "mesh.edge/v1", "kind": "BootstrapTokenRequest", "usages": 1}))[1])
        out = f"{work}/callgrind.out"
        agent_args = [agent_bin, "--server", f"https://127.0.0.1:{cport}", "--data-dir", f"{work}/agent",
                      "--dns-listen", f"127.0.0.1:{dport}", "--admin-listen", f"127.0.0.1:{aport}",
                      "--node-name", "order", "--site", "a", "--log-level", "error"]
        join = ["--join-token", token["token"], "--ca-cert-hash", token["caCertHash"]]
        # The edge part (perf/edge-twins): a broker, a device with its mapper, a workload.
        mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        if not os.path.exists(mosquitto):
            raise SystemExit("startup_order: mosquitto is not installed (scripts/bootstrap installs it)")
        mqtt = free_port()
        with open(f"{work}/mosquitto.conf", "w") as f:
            f.write(f"listener {mqtt} 127.0.0.1\nallow_anonymous true\npersistence false\n")
        procs.append(subprocess.Popen([mosquitto, "-c", f"{work}/mosquitto.conf"], stderr=subprocess.DEVNULL))
        with open(f"{work}/agent.yaml", "w") as f:
            f.write(f"mqttBroker: 127.0.0.1:{mqtt}\n")
        agent_args[1:1] = ["--config", f"{work}/agent.yaml"]
        put_edge(cport, "order")
        if a.native_faults:
            merge_order(a.out, native_faults(agent_args, join, work, aport, syms, starts, procs, control, cport,
                                             backend.server_address[1],
                                             lambda: mapper_reports(os.path.join(a.bin, "thermostat-mapper"), mqtt,
                                                                    cport, 100)))
            return
        agent = subprocess.Popen(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", "--demangle=no",
                                  "--dump-instr=yes"] + agent_args + join, stderr=subprocess.DEVNULL)
        procs.append(agent)
        wait_until(lambda: request(aport, "GET", "/readyz")[0] == 200, 300, "mesh-agent ready (under valgrind)")
        wait_until(lambda: edge_synced(aport), 300, "the device and the workload (under valgrind)")
        # Idle includes the node agent's first heartbeat (every 20 s +- 10% over its kept-alive TLS connection).
        time.sleep(a.idle_seconds)
        subprocess.run(["callgrind_control", "--dump=idle", str(agent.pid)], check=True, capture_output=True)

        # Serving: a few services through their whole life, names, HTTP through a VIP, the admin API.
        bport = backend.server_address[1]
        for i in range(20):
            put_service(cport, f"s{i}", bport)
        wait_until(lambda: routes_listening(aport, 40), 300, "routes listening")
        vip = json.loads(request(cport, "GET", "/apis/mesh.edge/v1/namespaces/ns/services/s0")[1])["spec"]["clusterIP"]
        for _ in range(20):
            request(80, "GET", "/", host=vip)
            c = socket.create_connection((vip, 81), timeout=10)
            c.sendall(b"GET / HTTP/1.0\r\n\r\n")
            c.recv(4096)
            c.close()
            dns_query(dport, "s1.ns.svc.cluster.local", 1)
            dns_query(dport, "_http._tcp.s1.ns.svc.cluster.local", 33)
            dns_query(dport, "s1.ns.svc.cluster.local", 1, tcp=True)
            dns_query(dport, "nothing.ns.svc.cluster.local", 28)
        for path in ("/routes", "/metrics", "/healthz", "/readyz", "/twins", "/workloads"):
            request(aport, "GET", path)
        mapper_reports(os.path.join(a.bin, "thermostat-mapper"), mqtt, cport, 100)
        request(cport, "DELETE", "/apis/mesh.edge/v1/namespaces/ns/services/s19")
        time.sleep(2)
        subprocess.run(["callgrind_control", "--dump=serving", str(agent.pid)], check=True, capture_output=True)
        # Empty the table (and the agent's cache) for the restart below.
        for i in range(19):
            request(cport, "DELETE", f"/apis/mesh.edge/v1/namespaces/ns/services/s{i}")
            request(cport, "DELETE", f"/apis/mesh.edge/v1/namespaces/ns/endpoints/s{i}")
        request(cport, "DELETE", "/apis/mesh.edge/v1/namespaces/ns/endpoints/s19")
        wait_until(lambda: not json.loads(request(aport, "GET", "/routes")[1])["dataPlane"]["routes"], 120,
                   "an empty table")
        agent.send_signal(signal.SIGTERM)
        agent.wait(120)
        dumps = sorted(glob.glob(out + ".*"), key=lambda p: int(p.rsplit(".", 1)[1]))
        if len(dumps) < 2:
            raise SystemExit(f"startup_order: expected two callgrind dumps, found {dumps}")
        idle = executed_functions(dumps[0], "mesh-agent", syms, starts, names)
        serving = executed_functions(dumps[1], "mesh-agent", syms, starts, names)

        # Every later start: enrolled (its certificate loaded and checked instead of a join); empty table.
        out2 = f"{work}/callgrind2.out"
        agent = subprocess.Popen(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out2}", "--demangle=no",
                                  "--dump-instr=yes"] + agent_args, stderr=subprocess.DEVNULL)
        procs.append(agent)
        wait_until(lambda: request(aport, "GET", "/readyz")[0] == 200, 300, "mesh-agent restart (under valgrind)")
        wait_until(lambda: edge_synced(aport), 300, "the device and the workload after the restart (under valgrind)")
        time.sleep(a.idle_seconds)
        subprocess.run(["callgrind_control", "--dump=restart", str(agent.pid)], check=True, capture_output=True)
        agent.send_signal(signal.SIGTERM)
        agent.wait(120)
        dumps = sorted(glob.glob(out2 + ".*"), key=lambda p: int(p.rsplit(".", 1)[1]))
        if not dumps:
            raise SystemExit("startup_order: no callgrind dump of the restart")
        idle |= executed_functions(dumps[0], "mesh-agent", syms, starts, names)
        serving -= idle
    finally:
        footprint.stop_all(procs, 30)
        backend.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    with open(a.out, "w") as f:
        f.write("# mesh-agent start-up order (lld --symbol-ordering-file), generated by "
                "perf/footprint/startup_order.py.\n# Functions run from exec until ready and idle, then "
                "those run serving a few services. Stale names are ignored by the linker.\n")
        f.write("\n".join(sorted(idle)) + "\n# serving\n" + "\n".join(sorted(serving)) + "\n")
    print(f"startup_order: {len(idle)} start-up functions, {len(serving)} more serving -> {a.out}")


if __name__ == "__main__":
    main()
