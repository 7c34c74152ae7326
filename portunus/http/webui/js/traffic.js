// The traffic-history chart (SPEC §4.4, docs/quotas.md "History"): 1h / 24h / 7d / custom,
// bucket auto / 1m / 1h, bytes in and out per bucket, totals. An empty answer says why, as the
// runbook's "Traffic chart looks empty" does: samples exist only where bytes moved, retention.
import { get } from "./api.js";
import { add, h, clear, field, input, select, button, fmtBytes, fmtTime } from "./dom.js";
import { lineChart } from "./chart.js";
import { errorText } from "./forms.js";
import { t } from "./i18n.js";

const RANGES = { "1h": 3600, "24h": 86400, "7d": 7 * 86400 };
const STEP = { "1m": 60, "1h": 3600 };
const MAX_POINTS = 2000;

function localInput(secs) {
  const d = new Date(secs * 1000);
  const p = (n) => String(n).padStart(2, "0");
  return `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())}T${p(d.getHours())}:${p(d.getMinutes())}`;
}

// bytes per bucket from `from` to `to` (whole bytes, not a rate): a bucket without a sample moved nothing
function filled(res, from, to) {
  const step = STEP[res.bucket] || 60;
  const start = Math.floor(from / step) * step;
  const n = Math.min(MAX_POINTS, Math.max(1, Math.ceil((to - start) / step)));
  const first = to - start > n * step ? Math.floor((to - n * step) / step) * step : start;
  const ins = new Array(n).fill(0), outs = new Array(n).fill(0);
  for (const s of res.samples || []) {
    const i = Math.floor((s.ts - first) / step);
    if (i >= 0 && i < n) { ins[i] += s.bytes_in; outs[i] += s.bytes_out; }
  }
  return { ins, outs };
}

// path: "traffic/global", "users/alice/traffic", "clients/ID/traffic"; query: extra filters
export function trafficChart(path, { query = {}, id = "traffic" } = {}) {
  const range = select([["1h", t("traffic.range_1h")], ["24h", t("traffic.range_24h")], ["7d", t("traffic.range_7d")],
    ["custom", t("traffic.range_custom")]]);
  range.value = "24h";
  const bucket = select([["", t("traffic.bucket_auto")], ["1m", t("traffic.bucket_1m")], ["1h", t("traffic.bucket_1h")]]);
  const now = Math.floor(Date.now() / 1000);
  const from = input({ type: "datetime-local", value: localInput(now - 86400) });
  const to = input({ type: "datetime-local", value: localInput(now) });
  const custom = h("div.custom-range", { hidden: true }, field(t("traffic.from"), from, { name: `${id}_from` }),
    field(t("traffic.to"), to, { name: `${id}_to` }));
  const totals = h("p.totals", { id: `${id}-totals`, "aria-live": "polite" });
  const body = h("div.chart-holder", { id: `${id}-chart` });
  const box = h("div.traffic", { id },
    h("div.toolbar", field(t("traffic.range"), range, { name: `${id}_range` }),
      field(t("traffic.bucket"), bucket, { name: `${id}_bucket` }), custom,
      button(t("common.refresh"), () => load(), { class: "secondary" })),
    totals, body);

  function window() {
    if (range.value !== "custom") { const end = Math.floor(Date.now() / 1000); return [end - RANGES[range.value], end]; }
    return [Math.floor(Date.parse(from.value) / 1000), Math.floor(Date.parse(to.value) / 1000)];
  }

  async function load() {
    const [f, tt] = window();
    const q = new URLSearchParams({ ...query, from: String(f), to: String(tt) });
    if (bucket.value) q.set("bucket", bucket.value);
    box.dataset.state = "loading";
    try {
      const res = await get(`${path}?${q}`);
      totals.textContent = t("traffic.totals", { in: fmtBytes(res.total_bytes_in), out: fmtBytes(res.total_bytes_out),
        bucket: res.bucket });
      if (!(res.samples || []).length) {
        add(clear(body), h("div.empty.traffic-empty", h("p", h("strong", t("traffic.empty_title"))),
          h("ul", h("li", t("traffic.empty_no_samples")), h("li", t("traffic.empty_retention")),
            h("li", t("traffic.empty_last_hour")))));
        box.dataset.state = "empty";
        return;
      }
      const { ins, outs } = filled(res, f, tt);
      add(clear(body), lineChart([{ label: t("dash.in"), values: ins, className: "s-in" },
        { label: t("dash.out"), values: outs, className: "s-out" }],
      { formatY: (v) => fmtBytes(Math.round(v)), minMax: 1024, title: t("traffic.title") }),
      h("p.hint", t("traffic.per_bucket", { bucket: res.bucket, from: fmtTime(f), to: fmtTime(tt) })));
      box.dataset.state = "samples";
    } catch (err) {
      totals.textContent = "";
      add(clear(body), h("p.form-error.traffic-error", { role: "alert" }, errorText(err)));
      box.dataset.state = "error";
    }
  }
  range.addEventListener("change", () => { custom.hidden = range.value !== "custom"; load(); });
  bucket.addEventListener("change", load);
  from.addEventListener("change", load);
  to.addEventListener("change", load);
  box.load = load;
  load();
  return box;
}
