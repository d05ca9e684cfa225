// hlbook live view: one coin's book, depth, trades and best bid/offer over the
// gateway's public WebSocket API (/ws), plus the pipeline's /ready. No build step.
"use strict";
(() => {
  const BOOK_ROWS = 20, DEPTH_LEVELS = 100, TRADE_ROWS = 60;
  const PING_MS = 30000, READY_MS = 2000, MAX_BACKOFF_MS = 15000;
  const params = new URLSearchParams(location.search);
  const token = params.get("token");
  const $ = (id) => document.getElementById(id);

  const state = {
    coin: null, ws: null, conn: "connecting", attempts: 0, opened: 0, pinger: null,
    book: null, bbo: null, trades: [], tradeKeys: new Set(),
    received: 0, rate: 0, dirty: new Set(), frame: false, prevReady: null, stale: new Set(),
  };

  // ------------------------------------------------------------ helpers

  const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
  const esc = (s) => String(s).replace(/[&<>"]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" })[c]);
  const decimals = (s) => (String(s).split(".")[1] || "").length;
  const num = (v) => (v >= 1e6 ? `${(v / 1e6).toFixed(2)}M` : v >= 1e4 ? `${(v / 1e3).toFixed(1)}k` : String(Number(v.toPrecision(6))));
  const pad = (n, w = 2) => String(n).padStart(w, "0");
  const clock = (ms, milli) => {
    const d = new Date(ms);
    return `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}${milli ? "." + pad(d.getMilliseconds(), 3) : ""}`;
  };

  function endpoint(path) {  // relative to the page, so a path prefix behind a proxy still works
    const u = new URL(path, location.href);
    if (token) u.searchParams.set("token", token);
    return u;
  }

  async function info(payload) {
    const r = await fetch(endpoint("info"), { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(payload) });
    if (!r.ok) throw new Error(`POST /info ${payload.type}: HTTP ${r.status} ${(await r.text()).slice(0, 200)}`);
    return r.json();
  }

  let errorTimer = null;
  function showError(text) {
    const el = $("error");
    el.textContent = `${clock(Date.now())}  ${text}`;
    el.hidden = false;
    clearTimeout(errorTimer);
    errorTimer = setTimeout(() => { el.hidden = true; }, 10000);
  }

  // ------------------------------------------------------------ coins

  function sortCoins(names) {
    const perp = (c) => !c.includes("/") && !c.startsWith("@");
    return names.sort((a, b) => (perp(b) - perp(a)) || a.localeCompare(b, "en", { sensitivity: "base", numeric: true }));
  }

  async function loadCoins() {
    for (let delay = 1000; ; delay = Math.min(2 * delay, MAX_BACKOFF_MS)) {
      try {
        const coins = sortCoins(Object.keys(await info({ type: "allMids" })));
        if (coins.length) return coins;
        setConn("connecting", "no coins yet");
      } catch (e) {
        setConn("closed", `coin list: ${e.message}`);
      }
      await sleep(delay);
    }
  }

  function subscriptions(coin) {
    return [{ type: "l2Book", coin, nLevels: DEPTH_LEVELS }, { type: "trades", coin }, { type: "bbo", coin }];
  }

  function selectCoin(coin) {
    const old = state.coin;
    if (coin === old) return;
    if (old) subscriptions(old).forEach((s) => send({ method: "unsubscribe", subscription: s }));
    state.coin = coin;
    state.book = state.bbo = null;
    state.trades = [];
    state.tradeKeys.clear();
    $("coin").value = coin;
    const p = new URLSearchParams(location.search);
    p.set("coin", coin);
    history.replaceState(null, "", `${location.pathname}?${p}`);
    document.title = `${coin} · hlbook`;
    subscriptions(coin).forEach((s) => send({ method: "subscribe", subscription: s }));
    loadRecentTrades(coin);
    ["book", "bbo", "trades"].forEach(mark);
    renderStale();
  }

  function renderStale() {  // /ready's stale_coins: their shard is silent or not live, their book may be old
    $("coin-stale").hidden = !state.stale.has(state.coin);
    for (const option of $("coin").options) {
      const label = state.stale.has(option.value) ? `${option.value} · stale` : option.value;
      if (option.textContent !== label) option.textContent = label;
    }
  }

  async function loadRecentTrades(coin) {
    try {
      const trades = await info({ type: "recentTrades", coin });
      if (coin === state.coin && Array.isArray(trades)) addTrades(trades);
    } catch (e) {
      showError(e.message);
    }
  }

  // ------------------------------------------------------------ WebSocket

  function send(obj) {
    if (state.ws && state.ws.readyState === WebSocket.OPEN) state.ws.send(JSON.stringify(obj));
  }

  function setConn(kind, detail = "") {
    state.conn = kind;
    const el = $("conn");
    el.dataset.state = kind;
    el.textContent = kind === "open" ? "connected" : kind;
    $("conn-detail").textContent = detail;
  }

  function connect() {
    const u = endpoint("ws");
    u.protocol = location.protocol === "https:" ? "wss:" : "ws:";
    setConn("connecting", state.attempts ? `attempt ${state.attempts + 1}` : "");
    const ws = new WebSocket(u);
    state.ws = ws;
    ws.onopen = () => {
      state.opened++;
      setConn("open");
      if (state.coin) subscriptions(state.coin).forEach((s) => send({ method: "subscribe", subscription: s }));
      state.pinger = setInterval(() => send({ method: "ping" }), PING_MS);
    };
    ws.onmessage = (ev) => {
      state.attempts = 0;  // only a connection that delivers resets the backoff
      state.received++;
      let msg;
      try { msg = JSON.parse(ev.data); } catch { return; }
      onMessage(msg);
    };
    ws.onclose = (ev) => {
      if (state.ws !== ws) return;
      clearInterval(state.pinger);
      const base = Math.min(MAX_BACKOFF_MS, 500 * 2 ** state.attempts++);
      const delay = Math.round(base / 2 + Math.random() * base / 2);
      const why = ev.reason ? `${ev.code} ${ev.reason}` : `code ${ev.code}`;
      setConn("closed", `${why}; reconnecting in ${(delay / 1000).toFixed(1)} s`);
      setTimeout(connect, delay);
    };
  }

  function onMessage(msg) {
    const d = msg.data;
    switch (msg.channel) {
      case "l2Book":
        if (d && d.coin === state.coin) { state.book = d; mark("book"); }
        break;
      case "bbo":
        if (d && d.coin === state.coin) { state.bbo = d; mark("bbo"); }
        break;
      case "trades":
        if (Array.isArray(d)) addTrades(d.filter((t) => t.coin === state.coin));
        break;
      case "error":
        showError(typeof d === "string" ? d : JSON.stringify(d));
        break;
      default:  // pong, subscriptionResponse
        break;
    }
  }

  function addTrades(list) {
    let added = false;
    for (const t of list) {
      const key = `${t.tid}:${t.hash}:${t.px}:${t.sz}`;
      if (state.tradeKeys.has(key)) continue;
      state.tradeKeys.add(key);
      state.trades.push(t);
      added = true;
    }
    if (!added) return;
    state.trades.sort((a, b) => b.time - a.time);
    if (state.trades.length > TRADE_ROWS) {
      for (const t of state.trades.splice(TRADE_ROWS)) state.tradeKeys.delete(`${t.tid}:${t.hash}:${t.px}:${t.sz}`);
    }
    mark("trades");
  }

  // ------------------------------------------------------------ rendering

  function mark(what) {
    state.dirty.add(what);
    if (state.frame) return;
    state.frame = true;
    requestAnimationFrame(() => {
      state.frame = false;
      const dirty = new Set(state.dirty);
      state.dirty.clear();
      if (dirty.has("book")) { renderBook(); renderDepth(); }
      if (dirty.has("bbo")) renderBbo();
      if (dirty.has("trades")) renderTrades();
    });
  }

  function cumulative(levels) {
    let total = 0;
    return levels.map((l) => ({ px: l.px, sz: l.sz, p: Number(l.px), total: (total += Number(l.sz)) }));
  }

  function renderBook() {
    const book = state.book;
    const [bids, asks] = book ? book.levels.map((side) => cumulative(side.slice(0, BOOK_ROWS))) : [[], []];
    const most = Math.max(bids.length ? bids[bids.length - 1].total : 0, asks.length ? asks[asks.length - 1].total : 0) || 1;
    const row = (l, cells) => `<tr data-px="${esc(l.px)}" style="--w:${(100 * l.total / most).toFixed(1)}%">${cells}</tr>`;
    $("bids").tBodies[0].innerHTML = bids.map((l) => row(l, `<td>${num(l.total)}</td><td>${esc(l.sz)}</td><td class="px">${esc(l.px)}</td>`)).join("");
    $("asks").tBodies[0].innerHTML = asks.map((l) => row(l, `<td class="px">${esc(l.px)}</td><td>${esc(l.sz)}</td><td>${num(l.total)}</td>`)).join("");
    $("book-time").textContent = book ? `${book.coin} · ${clock(book.time, true)}` : "";
  }

  function renderBbo() {
    const [bid, ask] = state.bbo ? state.bbo.bbo : [null, null];
    $("bbo-bid-px").textContent = bid ? bid.px : "–";
    $("bbo-bid-sz").textContent = bid ? bid.sz : "";
    $("bbo-ask-px").textContent = ask ? ask.px : "–";
    $("bbo-ask-sz").textContent = ask ? ask.sz : "";
    let spread = "spread –";
    if (bid && ask) {
      const s = Number(ask.px) - Number(bid.px), mid = (Number(ask.px) + Number(bid.px)) / 2;
      spread = `spread ${s.toFixed(Math.max(decimals(bid.px), decimals(ask.px)))} (${(1e4 * s / mid).toFixed(2)} bps)`;
    }
    $("bbo-spread").textContent = spread;
  }

  function renderTrades() {
    $("trades").tBodies[0].innerHTML = state.trades.map((t) =>
      `<tr class="${t.side === "B" ? "buy" : "sell"}"><td>${clock(t.time)}</td><td class="px">${esc(t.px)}</td><td>${esc(t.sz)}</td></tr>`).join("");
  }

  function niceStep(span, count) {
    const raw = span / count, mag = 10 ** Math.floor(Math.log10(raw)), f = raw / mag;
    return mag * (f < 1.5 ? 1 : f < 3 ? 2 : f < 7 ? 5 : 10);
  }

  function renderDepth() {
    const canvas = $("depth"), dpr = window.devicePixelRatio || 1;
    const w = canvas.clientWidth, h = canvas.clientHeight;
    if (canvas.width !== Math.round(w * dpr) || canvas.height !== Math.round(h * dpr)) {
      canvas.width = Math.round(w * dpr);
      canvas.height = Math.round(h * dpr);
    }
    const g = canvas.getContext("2d");
    g.setTransform(dpr, 0, 0, dpr, 0, 0);
    g.clearRect(0, 0, w, h);
    const css = getComputedStyle(document.body);
    const color = (name) => css.getPropertyValue(name).trim();
    g.font = "11px ui-monospace, monospace";
    g.fillStyle = color("--muted");
    const book = state.book;
    const [bids, asks] = book ? book.levels.map(cumulative) : [[], []];
    if (!bids.length || !asks.length) {
      g.fillText(book ? "one side of the book is empty" : "waiting for the book…", 12, 20);
      canvas.dataset.drawn = "0";
      return;
    }
    const mid = (bids[0].p + asks[0].p) / 2;
    const half = Math.max(Math.min(mid - bids[bids.length - 1].p, asks[asks.length - 1].p - mid), (asks[0].p - bids[0].p) || mid * 1e-4);
    const lo = mid - half, hi = mid + half;
    const inRange = (side, keep) => side.filter(keep);
    const b = inRange(bids, (l) => l.p >= lo), a = inRange(asks, (l) => l.p <= hi);
    const top = Math.max(b.length ? b[b.length - 1].total : 0, a.length ? a[a.length - 1].total : 0) * 1.1 || 1;
    const L = 8, R = 56, T = 10, B = 22, pw = w - L - R, ph = h - T - B;
    const x = (p) => L + (p - lo) / (hi - lo) * pw, y = (v) => T + ph - v / top * ph;

    // grid and axes
    g.strokeStyle = color("--grid");
    g.lineWidth = 1;
    g.textAlign = "left";
    const ys = niceStep(top, 4);
    for (let v = ys; v < top; v += ys) {
      g.beginPath(); g.moveTo(L, Math.round(y(v)) + 0.5); g.lineTo(L + pw, Math.round(y(v)) + 0.5); g.stroke();
      g.fillText(num(v), L + pw + 6, y(v) + 4);
    }
    const xs = niceStep(hi - lo, 6), places = Math.max(0, Math.min(8, -Math.floor(Math.log10(xs))));
    g.textAlign = "center";
    for (let p = Math.ceil(lo / xs) * xs; p <= hi; p += xs) {
      g.beginPath(); g.moveTo(Math.round(x(p)) + 0.5, T); g.lineTo(Math.round(x(p)) + 0.5, T + ph); g.stroke();
      g.fillText(p.toFixed(places), x(p), h - 6);
    }

    // one side: a step line from the best level outwards, filled down to the axis
    const side = (levels, edge, stroke, fill) => {
      if (!levels.length) return;
      g.beginPath();
      g.moveTo(x(levels[0].p), y(0));
      let prev = 0;
      for (const l of levels) { g.lineTo(x(l.p), y(prev)); g.lineTo(x(l.p), y(l.total)); prev = l.total; }
      g.lineTo(x(edge), y(prev));
      g.lineTo(x(edge), y(0));
      g.closePath();
      g.fillStyle = fill; g.fill();
      g.strokeStyle = stroke; g.lineWidth = 1.5; g.stroke();
    };
    side(b, lo, color("--bid"), color("--bid-fill"));
    side(a, hi, color("--ask"), color("--ask-fill"));

    // mid price
    g.setLineDash([4, 4]);
    g.strokeStyle = color("--muted");
    g.lineWidth = 1;
    g.beginPath(); g.moveTo(Math.round(x(mid)) + 0.5, T); g.lineTo(Math.round(x(mid)) + 0.5, T + ph); g.stroke();
    g.setLineDash([]);
    g.fillStyle = color("--fg");
    g.fillText(`mid ${mid.toFixed(Math.max(decimals(bids[0].px), decimals(asks[0].px)) + 1)}`, x(mid), T + 12);
    canvas.dataset.drawn = String(b.length + a.length);
  }

  // ------------------------------------------------------------ pipeline status

  async function pollReady() {
    for (;;) {
      try {
        const r = await fetch(endpoint("ready"), { cache: "no-store" });
        renderReady(await r.json());
      } catch (e) {
        const el = $("ready");
        el.dataset.state = "down";
        el.textContent = "unreachable";
      }
      await sleep(READY_MS);
    }
  }

  function renderReady(body) {
    const el = $("ready");
    el.dataset.state = body.ready ? "ready" : "not-ready";
    el.textContent = body.ready ? "ready" : "not ready";
    const now = Date.now(), prev = state.prevReady;
    $("shards").tBodies[0].innerHTML = (body.shards || []).map((s) => {
      const before = prev && prev.body.shards && prev.body.shards.find((p) => p.shard === s.shard);
      const rate = before ? ((s.height - before.height) / ((now - prev.at) / 1000)).toFixed(1) : "–";
      const coins = Object.entries(s.coins || {}).map(([k, n]) => `<span class="chip" data-state="${esc(k)}">${esc(k)} ${n}</span>`).join(" ");
      const live = s.live ? "yes" : s.silent_s != null ? `silent ${Math.round(s.silent_s)} s` : `no (${esc(s.phase)})`;
      return `<tr><td>${s.shard}</td><td>${s.height ?? "–"}</td><td>${rate}</td><td><span class="dot" data-live="${s.live}"></span>${live}</td><td>${coins}</td></tr>`;
    }).join("");
    $("ready-time").textContent = clock(now);
    const ms = (s) => `${Math.round(s * 1000)} ms`;
    $("ready-lag").textContent = body.lag_s == null ? "" : `lag ${ms(body.lag_s)}` + (body.delay_s == null ? "" : ` (hlbook's ${ms(body.delay_s)})`);
    state.prevReady = { body, at: now };
    state.stale = new Set(body.stale_coins || []);
    renderStale();
  }

  // ------------------------------------------------------------ start

  setInterval(() => {  // message rate in the header
    state.rate = state.received;
    state.received = 0;
    if (state.conn === "open") $("conn-detail").textContent = `${state.rate} msg/s`;
  }, 1000);
  window.addEventListener("resize", () => mark("book"));

  async function main() {
    pollReady();
    const coins = await loadCoins();
    const select = $("coin");
    select.innerHTML = coins.map((c) => `<option value="${esc(c)}">${esc(c)}</option>`).join("");
    select.disabled = false;
    select.addEventListener("change", () => selectCoin(select.value));
    const wanted = params.get("coin");
    state.coin = null;
    connect();
    selectCoin(coins.includes(wanted) ? wanted : coins.includes("BTC") ? "BTC" : coins[0]);
  }

  window.hlview = { state, selectCoin, reconnect: () => state.ws && state.ws.close() };
  main();
})();
