// The TypeScript SDK (@nktkas/hyperliquid, pinned in package.json) against a running hlbook:
// `node --experimental-websocket sdk_calls.mjs BASE_URL COIN [own]`. Every InfoClient method that
// hlbook answers or forwards to the node, over HTTP (POST /info) and over the WebSocket (`post`),
// and the SubscriptionClient feeds hlbook serves, each called with the SDK's defaults; every
// answer and event is checked against the SDK's own response schema (valibot, exported by the
// SDK beside each method: `XResponse`, `XEvent`). With `own`, only the info types a gateway
// without a node info server builds itself (meta, spotMeta, the asset contexts, perpDexs).
// Prints one JSON line per call:
// {"call", "ok", "error"?, "size"? (an answer's items or keys), "count"? (a feed's events)};
// tests/test_ts_sdk.py reads them.
import * as v from "valibot";
import { HttpTransport, InfoClient, SubscriptionClient, WebSocketTransport } from "@nktkas/hyperliquid";
import * as infoSchemas from "@nktkas/hyperliquid/api/info";
import * as eventSchemas from "@nktkas/hyperliquid/api/subscription";

const [base, coin, mode] = process.argv.slice(2);
const WAIT_MS = 10_000; // for a feed's events
const EVENTS = 2; // events checked per feed
const SPECIAL = new Set(["0xffffffffffffffffffffffffffffffffffffffff", "0xfefefefefefefefefefefefefefefefefefefefe"]);

const report = (call, ok, extra) => console.log(JSON.stringify({ call, ok, ...extra }));
const title = (name) => name[0].toUpperCase() + name.slice(1);
const issues = (schema, data) => {
  const result = v.safeParse(schema, data);
  return result.success ? null : result.issues.slice(0, 3).map((i) => `${v.getDotPath(i) ?? "(root)"}: ${i.message}`).join("; ");
};

// Where SDK 0.31.0's schemas are stricter than the public API, as the SDK's later types say:
// spotMeta's `outcomes` and `questions` (HIP-4 outcome markets, seen on testnet, where the SDK's
// tests run) are gone from 0.32.0's types (its commit d6e1ca7), and a market maker's userAddRate
// is a rebate, negative (0.33's types).
const spotMeta = v.omit(infoSchemas.SpotMetaResponse, ["outcomes", "questions"]);
const signedDecimal = v.pipe(v.string(), v.regex(/^-?[0-9]+(\.[0-9]+)?$/));
const SCHEMAS = {
  ...infoSchemas,
  SpotMetaResponse: spotMeta,
  SpotMetaAndAssetCtxsResponse: v.tuple([spotMeta, infoSchemas.SpotMetaAndAssetCtxsResponse.items[1]]),
  UserFeesResponse: v.object({ ...infoSchemas.UserFeesResponse.entries, userAddRate: signedDecimal, userSpotAddRate: signedDecimal }),
};

/** One info call: `client[method](params)` checked against the SDK's `<Method>Response`. */
async function call(label, client, method, ...params) {
  try {
    const data = await client[method](...params);
    const bad = issues(SCHEMAS[`${title(method)}Response`], data);
    // how much came (an empty list fits any list's schema): items, or keys, or 0 for null
    const size = data === null ? 0 : Array.isArray(data) ? data.length : Object.keys(data).length;
    report(label, !bad, bad ? { error: `schema: ${bad}`, data: JSON.stringify(data).slice(0, 400) } : { size, status: data?.status });
    return data;
  } catch (error) {
    report(label, false, { error: `${error.name}: ${error.message}` });
    return undefined;
  }
}

/** One feed: subscribe (to each of `params` when a list), wait for EVENTS events (or `want`),
 * check each against `<Feed>Event`. */
async function feed(label, subs, method, params, want = EVENTS) {
  const schema = eventSchemas[`${title(method)}Event`];
  const events = [];
  let done;
  const arrived = new Promise((resolve) => (done = resolve));
  const listener = (event) => {
    events.push(event);
    if (events.length >= want) done();
  };
  try {
    const each = params === null ? [[]] : (Array.isArray(params) ? params : [params]).map((p) => [p]);
    const subscriptions = await Promise.all(each.map((p) => subs[method](...p, listener)));
    const timer = setTimeout(done, WAIT_MS);
    await arrived;
    clearTimeout(timer);
    for (const subscription of subscriptions) await subscription.unsubscribe();
  } catch (error) {
    report(label, false, { error: `${error.name}: ${error.message}` });
    return;
  }
  const bad = events.map((e) => issues(schema, e)).find((x) => x);
  if (events.length < want) report(label, false, { error: `${events.length} of ${want} events in ${WAIT_MS} ms`, count: events.length });
  else report(label, !bad, bad ? { error: `schema: ${bad}`, count: events.length } : { count: events.length });
}

/** The busiest traders of the recent trades, busiest first (the user feeds' events come soon), not
 * the HIP-2 or assistance fund addresses (their orders have no statuses). */
async function busiest(client) {
  const seen = new Map();
  for (const u of (await client.recentTrades({ coin })).flatMap((t) => t.users)) {
    if (!SPECIAL.has(u)) seen.set(u, (seen.get(u) ?? 0) + 1);
  }
  return [...seen].sort((a, b) => b[1] - a[1]).map(([u]) => u);
}

/** For the info calls: a busy trader with a fill of an order that has a status (not a TWAP slice's). */
async function userWithOrders(client) {
  const ranked = await busiest(client);
  for (const user of ranked.slice(0, 10)) {
    if ((await client.userFills({ user })).some((f) => f.twapId === null)) return user;
  }
  return ranked[0] ?? "0x0000000000000000000000000000000000000001";
}

async function infoCalls(prefix, client, user) {
  const hour = Date.now() - 3_600_000;
  await call(`${prefix}.recentTrades`, client, "recentTrades", { coin });
  await call(`${prefix}.allMids`, client, "allMids");
  await call(`${prefix}.l2Book`, client, "l2Book", { coin });
  for (const nSigFigs of [2, 3, 4, 5]) await call(`${prefix}.l2Book.nSigFigs${nSigFigs}`, client, "l2Book", { coin, nSigFigs });
  await call(`${prefix}.l2Book.mantissa5`, client, "l2Book", { coin, nSigFigs: 5, mantissa: 5 });
  await call(`${prefix}.l2Book.unknownCoin`, client, "l2Book", { coin: "NONE/EXISTENT" });
  await call(`${prefix}.candleSnapshot`, client, "candleSnapshot", { coin, interval: "1m", startTime: hour });
  const fills = (await call(`${prefix}.userFills`, client, "userFills", { user })) ?? [];
  await call(`${prefix}.userFills.aggregateByTime`, client, "userFills", { user, aggregateByTime: true });
  await call(`${prefix}.userFillsByTime`, client, "userFillsByTime", { user, startTime: hour });
  await call(`${prefix}.historicalOrders`, client, "historicalOrders", { user });
  await call(`${prefix}.openOrders`, client, "openOrders", { user });
  await call(`${prefix}.frontendOpenOrders`, client, "frontendOpenOrders", { user });
  const oid = fills.find((f) => f.twapId === null)?.oid ?? 1;
  await call(`${prefix}.orderStatus`, client, "orderStatus", { user, oid });
  await call(`${prefix}.orderStatus.unknownOid`, client, "orderStatus", { user, oid: 1 });
  await call(`${prefix}.userTwapSliceFills`, client, "userTwapSliceFills", { user });
  await call(`${prefix}.userTwapSliceFillsByTime`, client, "userTwapSliceFillsByTime", { user, startTime: hour });
  // answered by the node's info server (here the simulator's), through hlbook
  for (const method of ["meta", "spotMeta", "metaAndAssetCtxs", "spotMetaAndAssetCtxs", "perpDexs", "exchangeStatus",
                        "perpDeployAuctionStatus", "predictedFundings", "vaultSummaries", "liquidatable",
                        "perpsAtOpenInterestCap"]) {
    await call(`${prefix}.${method}`, client, method);
  }
  for (const method of ["clearinghouseState", "spotClearinghouseState", "portfolio", "userFees", "userRole",
                        "spotDeployState", "delegatorSummary", "delegations", "delegatorRewards", "delegatorHistory",
                        "referral", "subAccounts", "userToMultiSigSigners", "userDexAbstraction", "userVaultEquities",
                        "userRateLimit", "extraAgents", "leadingVaults", "twapHistory"]) {
    await call(`${prefix}.${method}`, client, method, { user });
  }
  await call(`${prefix}.activeAssetData`, client, "activeAssetData", { user, coin });
  await call(`${prefix}.userFunding`, client, "userFunding", { user, startTime: hour });
  await call(`${prefix}.userNonFundingLedgerUpdates`, client, "userNonFundingLedgerUpdates", { user, startTime: hour });
  await call(`${prefix}.fundingHistory`, client, "fundingHistory", { coin, startTime: hour });
}

// the check itself: a negative size is refused
if (!issues(SCHEMAS.L2BookResponse, { coin, time: 1, levels: [[{ px: "1.0", sz: "-1.0", n: 1 }], []] })) {
  throw new Error("the SDK's L2BookResponse schema accepted a negative size");
}

const http = new InfoClient({ transport: new HttpTransport({ apiUrl: base }) });
if (mode === "own") { // a gateway without a node info server: the types it then builds itself
  for (const method of ["meta", "spotMeta", "metaAndAssetCtxs", "spotMetaAndAssetCtxs", "perpDexs"]) {
    await call(`own.${method}`, http, method);
  }
  process.exit(0);
}
const user = await userWithOrders(http);
await infoCalls("http", http, user);
const transport = new WebSocketTransport({ url: `${base.replace(/^http/, "ws")}/ws` });
try {
  await transport.ready();
  await infoCalls("ws", new InfoClient({ transport }), user);
  const subs = new SubscriptionClient({ transport });
  await feed("sub.l2Book", subs, "l2Book", { coin });
  await feed("sub.l2Book.nSigFigs3", subs, "l2Book", { coin, nSigFigs: 3 });
  await feed("sub.trades", subs, "trades", { coin });
  await feed("sub.bbo", subs, "bbo", { coin });
  await feed("sub.allMids", subs, "allMids", null);
  await feed("sub.candle", subs, "candle", { coin, interval: "1m" });
  await feed("sub.activeAssetCtx", subs, "activeAssetCtx", { coin });
  // userEvents has no snapshot: the 5 busiest traders now, one of whom trades within the wait
  const active = (await busiest(http)).slice(0, 5).map((u) => ({ user: u }));
  await feed("sub.userEvents", subs, "userEvents", active, 1);
  await feed("sub.userFills", subs, "userFills", { user }, 1);
  await feed("sub.orderUpdates", subs, "orderUpdates", { user }, 1);
  await feed("sub.openOrders", subs, "openOrders", { user }, 1);
  await feed("sub.userTwapSliceFills", subs, "userTwapSliceFills", { user }, 1);
} finally {
  await transport.close();
}
