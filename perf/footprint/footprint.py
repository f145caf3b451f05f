#!/usr/bin/env python3
"""Footprint of mesh-agent (release build): binary size, idle RSS, RSS with N services / M endpoints,
start-up time from its cache, and RSS under HTTP load through a VIP.

Run through perf/footprint (which builds the binaries). Prints a table and writes JSON.
Bounded: at most 20,000 services and 200,000 endpoints; every wait has a deadline.
"""
import argparse, http.client, json, os, signal, socket, subprocess, sys, tempfile, threading, time

def rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0

def cpu_ticks(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])

def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p

def wait_until(pred, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if pred():
                return True
        except Exception:
            pass
        time.sleep(0.05)
    raise SystemExit(f"footprint: timed out after {timeout}s waiting for {what}")

def get(port, path):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    c.request("GET", path)
    r = c.getresponse()
    body = r.read()
    c.close()
    return r.status, body

def put_many(port, objects, workers=4):
    """PUTs every (path, body) over keep-alive connections from a few threads."""
    chunks = [objects[i::workers] for i in range(workers)]
    errors = []
    def run(chunk):
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        for path, body in chunk:
            c.request("PUT", path, body=body, headers={"Content-Type": "application/json"})
            r = c.getresponse(); data = r.read()
            if r.status >= 300:
                errors.append(f"{path}: {r.status} {data[:200]!r}")
                return
    threads = [threading.Thread(target=run, args=(ch,)) for ch in chunks]
    for t in threads: t.start()
    for t in threads: t.join()
    if errors:
        raise SystemExit("footprint: " + errors[0])

def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--bin", required=True, help="folder with release mesh-control and mesh-agent")
    ap.add_argument("--services", type=int, default=10000)
    ap.add_argument("--endpoints-per-service", type=int, default=10)
    ap.add_argument("--load-seconds", type=float, default=5)
    ap.add_argument("--json", default="perf/out/footprint.json")
    a = ap.parse_args()
    a.services = max(1, min(a.services, 20000))
    a.endpoints_per_service = max(1, min(a.endpoints_per_service, 10))
    work = tempfile.mkdtemp(prefix="mesh-footprint-")
    cport, aport, dport = free_port(), free_port(), free_port()
    with open(f"{work}/control.yaml", "w") as f:
        # durability normal: the bench measures the agent, not fsync; 127.64.0.0/10 holds every VIP.
        f.write(f"listen: 127.0.0.1:{cport}\ndataDir: {work}/control\nserviceCIDRs: [127.64.0.0/10]\ndurability: normal\nlogLevel: warning\n")
    procs = []
    def start_agent():
        p = subprocess.Popen([f"{a.bin}/mesh-agent", "--server", f"http://127.0.0.1:{cport}", "--data-dir", f"{work}/agent",
                              "--dns-listen", f"127.0.0.1:{dport}", "--admin-listen", f"127.0.0.1:{aport}",
                              "--node-name", "bench", "--site", "a", "--log-level", "error"])
        procs.append(p)
        return p
    results = {}
    try:
        control = subprocess.Popen([f"{a.bin}/mesh-control", "--config", f"{work}/control.yaml"])
        procs.append(control)
        wait_until(lambda: get(cport, "/readyz")[0] == 200, 30, "mesh-control")
        results["binary size mesh-agent (MB)"] = round(os.path.getsize(f"{a.bin}/mesh-agent") / 1e6, 1)
        results["binary size mesh-control (MB)"] = round(os.path.getsize(f"{a.bin}/mesh-control") / 1e6, 1)

        t0 = time.time()
        agent = start_agent()
        wait_until(lambda: get(aport, "/readyz")[0] == 200, 30, "mesh-agent ready")
        results["agent start-up, empty (s)"] = round(time.time() - t0, 3)
        time.sleep(2)
        results["agent RSS idle (MB)"] = round(rss_kb(agent.pid) / 1024, 1)

        # A backend for the load phase: a tiny HTTP server on loopback.
        backend_port = free_port()
        backend = subprocess.Popen([sys.executable, "-c", f"""
import http.server, socketserver
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        b = b"x" * 100
        self.send_response(200); self.send_header("Content-Length", str(len(b))); self.end_headers(); self.wfile.write(b)
    def log_message(self, *a): pass
socketserver.ThreadingTCPServer.allow_reuse_address = True
socketserver.ThreadingTCPServer(("127.0.0.1", {backend_port}), H).serve_forever()
"""])
        procs.append(backend)

        n, m = a.services, a.endpoints_per_service
        objects = []
        for i in range(n):
            ns = f"ns{i % 50}"
            svc = {"apiVersion": "mesh.edge/v1", "kind": "Service", "metadata": {"name": f"s{i}", "namespace": ns},
                   "spec": {"ports": [{"name": "http", "port": 80, "protocol": "HTTP"}]}}
            eps = {"apiVersion": "mesh.edge/v1", "kind": "Endpoints", "metadata": {"name": f"s{i}", "namespace": ns},
                   "spec": {"addresses": [{"ip": "127.0.0.1" if i == 0 else f"198.18.{(i * m + j) // 250 % 250}.{(i * m + j) % 250 + 1}",
                                           "ports": [{"name": "http", "port": backend_port if i == 0 else 8080}], "site": "a"}
                                          for j in range(m)]}}
            objects.append((f"/apis/mesh.edge/v1/namespaces/{ns}/services/s{i}", json.dumps(svc)))
            objects.append((f"/apis/mesh.edge/v1/namespaces/{ns}/endpoints/s{i}", json.dumps(eps)))
        t0 = time.time()
        put_many(cport, objects)
        results["objects written (services + endpoints)"] = len(objects)
        results["write time (s)"] = round(time.time() - t0, 1)

        def routes_listening():
            status, body = get(aport, "/routes")
            r = json.loads(body)
            return sum(1 for x in r["dataPlane"]["routes"] if x["listening"]) >= n
        t0 = time.time()
        wait_until(routes_listening, 300, f"{n} routes listening")
        results["agent catch-up after the last write (s)"] = round(time.time() - t0, 2)
        time.sleep(2)
        results[f"agent RSS with {n} services / {n * m} endpoints (MB)"] = round(rss_kb(agent.pid) / 1024, 1)
        results["control RSS with that table (MB)"] = round(rss_kb(control.pid) / 1024, 1)

        # Under load: HTTP GETs through the first service's VIP from a few keep-alive clients.
        status, body = get(cport, "/apis/mesh.edge/v1/namespaces/ns0/services/s0")
        vip = json.loads(body)["spec"]["clusterIP"]
        stop = time.time() + a.load_seconds
        counts = []
        def load():
            c = http.client.HTTPConnection(vip, 80, timeout=10); k = 0
            while time.time() < stop:
                c.request("GET", "/"); c.getresponse().read(); k += 1
            counts.append(k)
        ticks0 = cpu_ticks(agent.pid)
        peak = 0
        threads = [threading.Thread(target=load) for _ in range(4)]
        for t in threads: t.start()
        while any(t.is_alive() for t in threads):
            peak = max(peak, rss_kb(agent.pid)); time.sleep(0.1)
        ticks = cpu_ticks(agent.pid) - ticks0
        total = sum(counts)
        results["requests through the VIP under load"] = total
        results["agent RSS peak under load (MB)"] = round(peak / 1024, 1)
        results["agent CPU-us per request under load"] = round(ticks / os.sysconf("SC_CLK_TCK") * 1e6 / max(1, total), 1)

        # Restart from the cache with the control plane stopped: time until every route listens again.
        agent.send_signal(signal.SIGTERM); agent.wait(30)
        control.send_signal(signal.SIGTERM); control.wait(30)
        t0 = time.time()
        agent = start_agent()
        wait_until(routes_listening, 300, "routes from the cache")
        results[f"agent start-up from its cache, control plane down, {n} routes (s)"] = round(time.time() - t0, 2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try: p.wait(10)
                except subprocess.TimeoutExpired: p.kill()
        subprocess.run(["rm", "-rf", work])
    width = max(len(k) for k in results)
    for k, v in results.items():
        print(f"{k.ljust(width)}  {v}")
    os.makedirs(os.path.dirname(a.json) or ".", exist_ok=True)
    with open(a.json, "w") as f:
        json.dump(results, f, indent=2)

if __name__ == "__main__":
    main()
