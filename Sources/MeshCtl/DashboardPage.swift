/// The dashboard's one page: HTML, CSS and script inline (served by meshctl; nothing is fetched from
/// elsewhere). It long-polls `/state?after=VERSION` and redraws: sites as groups of nodes, relays, the links
/// between nodes as lines coloured by path (direct green, punched blue, relayed orange) with their RTT, and
/// the services with their endpoints per site. Elements carry `data-*` attributes for tests and scripts.
enum DashboardPage {
    static let html = #"""
        <!doctype html>
        <html lang="en">
        <head>
        <meta charset="utf-8">
        <title>edge-mesh</title>
        <style>
          body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }
          h1 { font-size: 1.3em; margin: 0 0 .2em; }
          #status { color: #666; margin-bottom: 1em; }
          #map { position: relative; }
          #sites { display: flex; flex-wrap: wrap; gap: 2.5em; position: relative; z-index: 1; }
          .site { border: 1px solid #bbb; border-radius: 8px; padding: .6em 1em; min-width: 12em; background: #fafafa; }
          .site h2 { font-size: 1em; margin: 0 0 .4em; }
          .node { list-style: none; margin: .3em 0; padding: .3em .6em; border-radius: 6px; background: #fff;
                  border: 2px solid #999; }
          .node.Ready { border-color: #2e7d32; }
          .node.NotReady { border-color: #c62828; background: #fdecea; }
          .node small { color: #666; display: block; }
          ul { padding: 0; margin: 0; }
          svg#lines { position: absolute; left: 0; top: 0; width: 100%; height: 100%; pointer-events: none; z-index: 2; }
          .legend span { display: inline-block; margin-right: 1.2em; }
          .relay { list-style: none; display: inline-block; margin: .2em .8em .2em 0; padding: .2em .6em;
                   border: 1px dashed #888; border-radius: 6px; }
          table { border-collapse: collapse; margin-top: .5em; }
          td, th { border-bottom: 1px solid #ddd; padding: .25em .8em; text-align: left; }
          .path-direct { color: #2e7d32; } .path-punched { color: #1565c0; } .path-relayed { color: #ef6c00; }
        </style>
        </head>
        <body>
        <h1>edge-mesh</h1>
        <div id="status">connecting…</div>
        <div id="map"><div id="sites"></div><svg id="lines"></svg></div>
        <h2>Links</h2>
        <div class="legend"><span class="path-direct">&#9644; direct</span><span class="path-punched">&#9644; punched</span><span class="path-relayed">&#9644; relayed</span></div>
        <ul id="links"></ul>
        <h2>Relays</h2>
        <ul id="relays"></ul>
        <h2>Services</h2>
        <table id="services"><thead><tr><th>service</th><th>VIP</th><th>ports</th><th>endpoints per site</th></tr></thead><tbody></tbody></table>
        <script>
        "use strict";
        const colours = { direct: "#2e7d32", punched: "#1565c0", relayed: "#ef6c00" };
        let version = -1;
        let state = null;

        function el(tag, attrs, text) {
          const e = document.createElement(tag);
          for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
          if (text !== undefined) e.textContent = text;
          return e;
        }

        function render(s) {
          state = s;
          document.getElementById("status").textContent =
            (s.synced ? "live" : "loading") + " · version " + s.version + " · " +
            s.sites.reduce((n, site) => n + site.nodes.length, 0) + " nodes, " + s.links.length + " links";
          const sites = document.getElementById("sites");
          sites.replaceChildren();
          for (const site of s.sites) {
            const box = el("div", { class: "site", "data-site": site.name });
            box.append(el("h2", {}, site.name === "-" ? "no site" : "site " + site.name));
            const list = el("ul");
            for (const n of site.nodes) {
              const li = el("li", { class: "node " + n.phase, id: "node-" + n.name, "data-node": n.name, "data-phase": n.phase });
              li.append(document.createTextNode(n.name + " · " + n.phase));
              li.append(el("small", {}, "last seen " + (n.lastSeen || "never") + (n.relay ? " · relay " + n.relay : "")));
              list.append(li);
            }
            box.append(list);
            sites.append(box);
          }
          const links = document.getElementById("links");
          links.replaceChildren();
          for (const l of s.links) {
            const text = l.from + " ↔ " + l.to + ": " + l.path + (l.relay ? " via " + l.relay : "") +
              (l.rttMillis !== null && l.rttMillis !== undefined ? ", ~" + l.rttMillis + " ms" : "");
            links.append(el("li", { class: "link path-" + l.path, "data-from": l.from, "data-to": l.to,
                                    "data-path": l.path, "data-colour": colours[l.path] || "#999" }, text));
          }
          const relays = document.getElementById("relays");
          relays.replaceChildren();
          for (const r of s.relays) {
            relays.append(el("li", { class: "relay", "data-relay": r.name, "data-phase": r.phase },
                             r.name + " · " + r.phase + " · " + r.addresses.join(", ")));
          }
          const body = document.querySelector("#services tbody");
          body.replaceChildren();
          for (const svc of s.services) {
            const tr = el("tr", { class: "service", "data-service": svc.name + "." + svc.namespace });
            tr.append(el("td", {}, svc.name + "." + svc.namespace), el("td", {}, svc.vip || "none"),
                      el("td", {}, svc.ports.join(", ")),
                      el("td", {}, Object.entries(svc.endpoints).sort().map(([k, v]) => k + ": " + v).join(", ") || "none"));
            body.append(tr);
          }
          drawLines();
        }

        function drawLines() {
          const svg = document.getElementById("lines");
          svg.replaceChildren();
          if (!state) return;
          const origin = document.getElementById("map").getBoundingClientRect();
          for (const l of state.links) {
            const a = document.getElementById("node-" + l.from), b = document.getElementById("node-" + l.to);
            if (!a || !b) continue;
            const ra = a.getBoundingClientRect(), rb = b.getBoundingClientRect();
            const line = document.createElementNS("http://www.w3.org/2000/svg", "line");
            line.setAttribute("class", "link-line");
            line.setAttribute("data-from", l.from);
            line.setAttribute("data-to", l.to);
            line.setAttribute("data-path", l.path);
            line.setAttribute("x1", ra.left + ra.width / 2 - origin.left);
            line.setAttribute("y1", ra.top + ra.height / 2 - origin.top);
            line.setAttribute("x2", rb.left + rb.width / 2 - origin.left);
            line.setAttribute("y2", rb.top + rb.height / 2 - origin.top);
            line.setAttribute("stroke", colours[l.path] || "#999");
            line.setAttribute("stroke-width", "3");
            line.setAttribute("stroke-opacity", "0.8");
            svg.append(line);
          }
        }

        // ?once: draw the current picture and stop following (for a headless browser's DOM dump).
        const once = new URLSearchParams(location.search).has("once");

        async function poll() {
          for (;;) {
            try {
              const r = await fetch("/state?after=" + version, { cache: "no-store" });
              if (!r.ok) throw new Error("HTTP " + r.status);
              const s = await r.json();
              if (s.version !== version) { version = s.version; render(s); }
              if (once) return;
            } catch (e) {
              document.getElementById("status").textContent = "meshctl dashboard is not answering (" + e.message + "); retrying";
              await new Promise(done => setTimeout(done, 1000));
            }
          }
        }
        window.addEventListener("resize", drawLines);
        poll();
        </script>
        </body>
        </html>
        """#
}
