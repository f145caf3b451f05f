#!/usr/bin/env python3
"""DNS responder benchmark: ours (dns-bench-server, release) vs unbound vs dnsmasq.

Every server serves the same 1,000 A records (svc<i>.bench.svc.cluster.local -> 10.96.<i/256>.<i%256>),
is pinned to CPU 1, and the load generators run on CPU 0 (PERF-NOTES: fair-run method). For each server:
  - max: closed loop for --duration seconds with `mesh-proxy-bench dns-load` (4 sockets, 256 queries in
    flight, answers taken and next queries sent 64 at a time with recvmmsg/sendmmsg): queries/s, avg latency,
    server CPU-microseconds per query (from /proc/PID/stat), the server's cores (1.0: it was the limit);
  - max (dnsperf): the same with dnsperf (-c 4 -T 1 -q 100). One dnsperf thread saturates CPU 0 near 300k
    queries/s while our responder still has CPU left, so this figure is the generator's limit as much as the
    server's; it is kept beside the other for comparison (perf/dns/RESULTS.md);
  - rate: dnsperf capped at --rate qps (-Q): average latency and CPU-us/query below saturation.
Other processes' CPU during each run is measured (per-process /proc/PID/stat); a run where they used
more than --noise cores is repeated (up to --retries times) and the last one is reported with a flag.
With --reps N the three servers run side by side (idle ones cost nothing) and are measured in turn N times;
each figure is the median over the N rounds (a single round swings ~10% between runs on this VM).
Without the generator (mesh-proxy-bench not built: benchmark(generator=None)), 'max' is dnsperf's.

  perf/dns/bench.py [--duration 10] [--rate 20000] [--names 1000] [--reps 3] [--skip-build]
Needs: scripts/bootstrap --perf (unbound, dnsperf), dnsmasq, taskset.
"""
import argparse, json, os, re, shutil, signal, socket, subprocess, sys, tempfile, time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TICK = os.sysconf("SC_CLK_TCK")


def free_port():
    for _ in range(50):
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        u.bind(("127.0.0.1", 0))
        port = u.getsockname()[1]
        t = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            t.bind(("127.0.0.1", port))
            return port
        except OSError:
            continue
        finally:
            u.close()
            t.close()
    raise SystemExit("no free port")


def cpu_seconds(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICK
    except (OSError, IndexError, ValueError):
        return None


def all_cpu():
    out = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            c = cpu_seconds(d)
            if c is not None:
                out[int(d)] = c
    return out


def others_cpu(before, after, exclude):
    total = 0.0
    for pid, c in after.items():
        if pid in exclude:
            continue
        total += max(0.0, c - before.get(pid, 0.0))
    return total


def wait_ready(port, name, timeout=10):
    q = bytes.fromhex("abcd01000001000000000000") + b"".join(
        bytes([len(l)]) + l.encode() for l in name.split(".")) + b"\x00\x00\x01\x00\x01"
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(0.2)
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            s.sendto(q, ("127.0.0.1", port))
            data, _ = s.recvfrom(4096)
            if data[:2] == b"\xab\xcd" and data[3] & 0x0F == 0 and data[7] >= 1:
                return True
        except OSError:
            time.sleep(0.1)
    return False


def dnsperf(port, qfile, duration, rate=None, pin=True):
    cmd = (["taskset", "-c", "0"] if pin else []) + ["dnsperf", "-s", "127.0.0.1", "-p", str(port), "-d", qfile,
           "-l", str(duration), "-c", "4", "-T", "1", "-q", "100"]
    if rate:
        cmd += ["-Q", str(rate)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60).stdout

    def num(pattern):
        m = re.search(pattern, out)
        return float(m.group(1)) if m else float("nan")
    return {
        "completed": num(r"Queries completed:\s+(\d+)"),
        "lost": num(r"Queries lost:\s+(\d+)"),
        "qps": num(r"Queries per second:\s+([\d.]+)"),
        "avg_ms": num(r"Average Latency \(s\):\s+([\d.]+)") * 1000,
        "stddev_ms": num(r"Latency StdDev \(s\):\s+([\d.]+)") * 1000,
        "noerror": "NOERROR" in out and "NXDOMAIN" not in out and "SERVFAIL" not in out,
        "raw": out,
    }


def dnsload(generator, port, qfile, duration, pin=True):
    """Closed loop with the batched generator (mesh-proxy-bench dns-load); dnsperf's keys."""
    cmd = (["taskset", "-c", "0"] if pin else []) + [generator, "dns-load", "--target", f"127.0.0.1:{port}",
                                                    "--queries", qfile, "--duration", str(duration),
                                                    "--warmup", "0.5", "--sockets", "4", "--outstanding", "256"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60)
    try:
        r = json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise SystemExit(f"dns-load failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return {"completed": float(r["completed"]), "lost": float(r["lost"]), "qps": float(r["qps"]),
            "avg_ms": float(r["avg_ms"]), "stddev_ms": float("nan"),
            "noerror": r["completed"] > 0 and r["noerror"] == r["completed"], "raw": proc.stdout}


QUIET_TRIES = [10]


def quiet_wait(limit_core, seconds=3, tries=None):
    tries = QUIET_TRIES[0] if tries is None else tries
    for _ in range(tries):
        b = all_cpu()
        time.sleep(seconds)
        used = others_cpu(b, all_cpu(), {os.getpid()}) / seconds
        if used <= limit_core:
            return used
    return used


def measure(server, port, qfile, duration, rate, noise, retries, quiet_seconds=3, pin=True, generator=None):
    results = {}
    phases = [("max", None, "dns-load"), ("max_dnsperf", None, "dnsperf")] if generator else [("max", None, "dnsperf")]
    for phase, r, tool in phases + [("rate", rate, "dnsperf")]:
        for attempt in range(retries + 1):
            if quiet_seconds > 0:
                quiet_wait(noise, quiet_seconds)
            before_all = all_cpu()
            s0 = cpu_seconds(server.pid)
            t0 = time.time()
            if tool == "dns-load":
                res = dnsload(generator, port, qfile, duration, pin)
            else:
                res = dnsperf(port, qfile, duration, r, pin)
            wall = time.time() - t0
            s1 = cpu_seconds(server.pid)
            after_all = all_cpu()
            exclude = {server.pid, os.getpid()} | {p for p in after_all if p not in before_all}
            other = others_cpu(before_all, after_all, exclude) / wall
            res["cpu_us_per_query"] = (s1 - s0) * 1e6 / res["completed"] if res["completed"] else float("nan")
            res["server_cores"] = (s1 - s0) / wall
            res["others_cores"] = other
            res["noisy"] = other > noise
            if not res["noisy"] or quiet_seconds <= 0:
                break
        results[phase] = res
    return results


def combine(runs):
    """One phase's result from its rounds: numbers are medians, `noerror` holds if it held in every round,
    `noisy` if any round was; `qps_runs` keeps every round's queries/s."""
    out = {}
    for key, first in runs[0].items():
        values = [r[key] for r in runs]
        if key == "noerror":
            out[key] = all(values)
        elif key == "noisy":
            out[key] = any(values)
        elif isinstance(first, (int, float)) and not isinstance(first, bool):
            ordered = sorted(values)
            n = len(ordered)
            out[key] = ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2
        else:
            out[key] = first
    out["qps_runs"] = [r.get("qps") for r in runs]
    return out


def benchmark(ours_bin, duration=10, rate=20000, names_count=1000, noise=0.05, retries=2, quiet_seconds=3,
              pin=True, log=sys.stderr, quiet_timeout=30, reps=1, generator=None):
    """Runs the three servers side by side and measures them in turn, `reps` rounds (medians); returns
    {"servers": {name: {"max": .., "rate": .., "rss_mb": ..}}, ...}."""
    QUIET_TRIES[0] = max(1, int(quiet_timeout / quiet_seconds)) if quiet_seconds > 0 else 1
    cpu_srv = ["taskset", "-c", "1"] if pin else []
    tmp = tempfile.mkdtemp(prefix="dns-perf-")
    names = [f"svc{i}.bench.svc.cluster.local" for i in range(names_count)]
    addrs = [f"10.96.{(i >> 8) & 255}.{i & 255}" for i in range(names_count)]
    qfile = os.path.join(tmp, "queries.txt")
    with open(qfile, "w") as f:
        for n in names:
            f.write(f"{n} A\n")
    hosts = os.path.join(tmp, "hosts")
    with open(hosts, "w") as f:
        for n, a in zip(names, addrs):
            f.write(f"{a} {n}\n")

    servers = []
    p_ours = free_port()
    servers.append(("ours", p_ours, cpu_srv + [ours_bin, "--host", "127.0.0.1", "--port", str(p_ours),
                                              "--names", str(names_count), "--threads", "1"]))
    p_unbound = free_port()
    conf = os.path.join(tmp, "unbound.conf")
    with open(conf, "w") as f:
        f.write(f"""server:
  interface: 127.0.0.1
  port: {p_unbound}
  do-daemonize: no
  chroot: ""
  username: ""
  directory: "{tmp}"
  pidfile: ""
  use-syslog: no
  logfile: ""
  verbosity: 0
  num-threads: 1
  so-reuseport: no
  access-control: 127.0.0.0/8 allow
  module-config: "iterator"
  do-ip6: no
  local-zone: "cluster.local." static
""")
        for n, a in zip(names, addrs):
            f.write(f'  local-data: "{n}. 30 IN A {a}"\n')
        f.write("remote-control:\n  control-enable: no\n")
    servers.append(("unbound", p_unbound, cpu_srv + ["unbound", "-d", "-c", conf]))
    p_dnsmasq = free_port()
    servers.append(("dnsmasq", p_dnsmasq, cpu_srv + ["dnsmasq", "--keep-in-foreground", "--no-resolv",
                                                     "--no-hosts", f"--addn-hosts={hosts}", f"--port={p_dnsmasq}",
                                                     "--listen-address=127.0.0.1", "--bind-interfaces", "--pid-file=",
                                                     "--local-ttl=30", "--cache-size=10000", "--user=root",
                                                     "--local=/cluster.local/"]))

    results = {}
    running = []  # (name, port, process)
    try:
        for name, port, cmd in servers:
            if not shutil.which(cmd[len(cpu_srv)]) and not os.path.exists(cmd[len(cpu_srv)]):
                print(f"dns: {name}: {cmd[len(cpu_srv)]} not installed, skipped", file=log)
                continue
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            running.append((name, port, proc))
            if not wait_ready(port, names[0]):
                print(f"dns: {name} did not answer on port {port}", file=log)
                running.pop()
                proc.kill()
        rounds = {name: [] for name, _, _ in running}
        for round_ in range(max(1, reps)):
            for name, port, proc in running:
                r = measure(proc, port, qfile, duration, rate, noise, retries, quiet_seconds, pin, generator)
                print(f"dns: {name} round {round_ + 1}/{max(1, reps)}: {r['max']['qps']:.0f} qps max "
                      f"({r['max']['server_cores']:.2f} cores), {r['max']['cpu_us_per_query']:.2f} CPU-us/query"
                      + (f"; dnsperf {r['max_dnsperf']['qps']:.0f} qps ({r['max_dnsperf']['server_cores']:.2f} cores)"
                         if "max_dnsperf" in r else ""), file=log)
                rounds[name].append(r)
        for name, port, proc in running:
            runs = rounds[name]
            results[name] = {phase: combine([r[phase] for r in runs]) for phase in runs[0]}
            results[name]["rss_mb"] = rss_mb(proc.pid)
    finally:
        for _, _, proc in running:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(tmp, ignore_errors=True)
    versions = {}
    for tool, vcmd in (("unbound", ["unbound", "-V"]), ("dnsmasq", ["dnsmasq", "--version"]),
                       ("dnsperf", ["dnsperf", "-h"])):
        try:
            out = subprocess.run(vcmd, capture_output=True, text=True)
            m = re.search(r"(\d+\.\d+(\.\d+)?)", out.stdout + out.stderr)
            versions[tool] = m.group(1) if m else "?"
        except OSError:
            versions[tool] = "not installed"
    for r in results.values():
        for phase in r.values():
            if isinstance(phase, dict):
                phase.pop("raw", None)
    return {"names": names_count, "duration": duration, "rate": rate, "reps": max(1, reps), "versions": versions,
            "generator": "mesh-proxy-bench dns-load" if generator else "dnsperf", "servers": results}


def rss_mb(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def report(res, out=sys.stdout):
    """Prints the table and the ratios of a benchmark() result."""
    results, rate = res["servers"], res["rate"]
    v = res["versions"]
    print(f"DNS perf: {res['names']} A names, server on CPU 1, max by {res.get('generator', 'dnsperf')} on CPU 0, "
          f"dnsperf -c 4 -T 1 -q 100 for the capped rate, {res['duration']} s per phase; "
          f"unbound {v.get('unbound')}, dnsmasq {v.get('dnsmasq')}", file=out)
    hdr = f"{'server':8} {'max qps':>10} {'avg ms':>8} {'CPU-us/q':>9} {'srv cores':>9} {'lost':>6} | " \
          f"{'@' + str(rate) + ' qps avg ms':>18} {'sd ms':>7} {'CPU-us/q':>9} | {'RSS MB':>6} {'others':>6}"
    print(hdr, file=out)
    print("-" * len(hdr), file=out)
    for name in ("ours", "unbound", "dnsmasq"):
        if name not in results:
            print(f"{name:8} (no result)", file=out)
            continue
        m, r = results[name]["max"], results[name]["rate"]
        flag = " noisy" if m["noisy"] or r["noisy"] else ""
        ok = "" if m["noerror"] and r["noerror"] else " (non-NOERROR answers!)"
        print(f"{name:8} {m['qps']:10.0f} {m['avg_ms']:8.3f} {m['cpu_us_per_query']:9.2f} {m['server_cores']:9.2f} "
              f"{int(m['lost']):6d} | {r['avg_ms']:18.3f} {r['stddev_ms']:7.3f} {r['cpu_us_per_query']:9.2f} | "
              f"{results[name].get('rss_mb') or 0:6.1f} {max(m['others_cores'], r['others_cores']):6.3f}{flag}{ok}",
              file=out)
    for line in ratio_lines(res):
        print(line, file=out)


def ratio_lines(res):
    results, rate = res["servers"], res["rate"]
    lines = []
    if "ours" in results:
        o = results["ours"]
        for peer in ("unbound", "dnsmasq"):
            if peer in results:
                p = results[peer]
                lines.append(
                    f"ours/{peer}: max qps x{ratio(o['max']['qps'], p['max']['qps'])}, "
                    f"CPU-us/query at max x{ratio(o['max']['cpu_us_per_query'], p['max']['cpu_us_per_query'])}, "
                    f"avg latency at {rate} qps x{ratio(o['rate']['avg_ms'], p['rate']['avg_ms'])}, "
                    f"CPU-us/query at {rate} qps x{ratio(o['rate']['cpu_us_per_query'], p['rate']['cpu_us_per_query'])}"
                    + (f"; dnsperf's max qps x{ratio(o['max_dnsperf']['qps'], p['max_dnsperf']['qps'])} "
                       f"(server cores {o['max_dnsperf']['server_cores']:.2f} vs {p['max_dnsperf']['server_cores']:.2f})"
                       if "max_dnsperf" in o and "max_dnsperf" in p else ""))
    return lines


def ratio(a, b):
    try:
        return f"{a / b:.2f}"
    except (ZeroDivisionError, TypeError):
        return "nan"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--rate", type=int, default=20000)
    ap.add_argument("--names", type=int, default=1000)
    ap.add_argument("--noise", type=float, default=0.05, help="other processes' CPU (cores) that makes a run noisy")
    ap.add_argument("--retries", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3, help="rounds over the three servers (medians are reported)")
    ap.add_argument("--skip-build", action="store_true")
    args = ap.parse_args()

    for tool in ("dnsperf", "unbound", "dnsmasq", "taskset"):
        if not shutil.which(tool) and not os.path.exists("/usr/sbin/" + tool):
            subprocess.run([os.path.join(ROOT, "scripts", "bootstrap"), "--perf"], check=True)
            break
    if not args.skip_build:
        subprocess.run([os.path.join(ROOT, "perf", "build"), "dns-bench-server", "mesh-proxy-bench"], check=True,
                       stdout=sys.stderr)
    bins = os.path.join(ROOT, "perf", ".build", "release")
    ours_bin = os.path.join(bins, "dns-bench-server")
    generator = os.path.join(bins, "mesh-proxy-bench")
    res = benchmark(ours_bin, args.duration, args.rate, args.names, args.noise, args.retries, reps=args.reps,
                    generator=generator if os.access(generator, os.X_OK) else None)
    report(res)


if __name__ == "__main__":
    main()
