"""The three Grafana dashboards, built with grafana-foundation-sdk: the one source of grafana/dashboards/*.json.

    python grafana/generate.py           rewrite the JSON files
    python grafana/generate.py --check   exit 1 when a committed file differs from what this builds

Every panel reads Prometheus through the `datasource` variable and filters on the `job`/`node`
(`rank`, `gpu`) variables; the node facts (the supervisors' durable facts, served by node_exporter's
textfile collector: docs/operations.md#node-facts) filter on `facts_job`, node_exporter's scrape job.
GPU panels read either source, chosen by the `gpu_source` variable:
this project's NVML metrics (resilient_gpu_*) or NVIDIA dcgm-exporter's (DCGM_FI_*). Each GPU
panel has one target per source, gated by `and on() (vector($gpu_source) == N)` so only the chosen
source draws; dcgm-exporter's host label `Hostname` is renamed to `node`.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from grafana_foundation_sdk.builders import common as cb
from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.builders import prometheus, stat, table, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common as cm
from grafana_foundation_sdk.models import dashboard as dm
from grafana_foundation_sdk.models import prometheus as pm

OUT = Path(__file__).with_name("dashboards")
DS = dm.DataSourceRef(type_val="prometheus", uid="${datasource}")
JOB_NODE = 'job=~"$job", node=~"$node"'
RANK = JOB_NODE + ', rank=~"$rank"'
GPU = JOB_NODE + ', gpu=~"$gpu"'
FACTS = 'job=~"$facts_job", node=~"$node"'
DCGM_GPU = 'Hostname=~"$node", gpu=~"$gpu"'
SOURCES = {"nvml": 1, "dcgm": 2}


# -- queries ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Q:
    expr: str
    legend: str = ""
    table: bool = False


def gated(source: str, expr: str) -> str:
    """`expr` only while the dashboard's gpu_source variable selects `source`."""
    return f"({expr}) and on() (vector($gpu_source) == {SOURCES[source]})"


def dcgm(field: str, by: str = "node, gpu", fn: Callable[[str], str] = lambda s: s) -> str:
    """A dcgm-exporter field per (node, gpu), its `Hostname` label renamed to `node`."""
    return f'max by ({by}) (label_replace({fn(f"{field}{{{DCGM_GPU}}}")}, "node", "$1", "Hostname", "(.*)"))'


def _target(q: Q, ref: str) -> prometheus.Dataquery:
    t = prometheus.Dataquery().expr(q.expr).legend_format(q.legend).ref_id(ref).datasource(DS)
    return t.format(pm.PromQueryFormat.TABLE).instant() if q.table else t


# -- panels ----------------------------------------------------------------------------------------------


class Grid:
    """Places panels left to right in rows of 24 columns."""

    def __init__(self) -> None:
        self.x = self.y = self.row_h = 0

    def row(self) -> dm.GridPos:
        self._wrap(24)
        pos = dm.GridPos(h=1, w=24, x=0, y=self.y)
        self.y += 1
        return pos

    def place(self, w: int, h: int) -> dm.GridPos:
        self._wrap(w)
        pos = dm.GridPos(h=h, w=w, x=self.x, y=self.y)
        self.x, self.row_h = self.x + w, max(self.row_h, h)
        return pos

    def _wrap(self, w: int) -> None:
        if self.x and self.x + w > 24 or w == 24:
            self.x, self.y, self.row_h = 0, self.y + self.row_h, 0


def _common(panel, title: str, queries: Sequence[Q], pos: dm.GridPos, unit: str | None, description: str | None):
    panel = panel.title(title).datasource(DS).grid_pos(pos)
    for ref, q in zip("ABCDEFGH", queries, strict=False):
        panel = panel.with_target(_target(q, ref))
    if unit:
        panel = panel.unit(unit)
    return panel.description(description) if description else panel


class Board:
    """A dashboard under construction: each method adds a row or panel after the last, placed by a Grid."""

    def __init__(self, dashboard: db.Dashboard) -> None:
        self.dashboard, self.layout = dashboard, Grid()

    def stat(
        self,
        title: str,
        q: Q,
        w: int,
        h: int,
        unit: str | None = None,
        *,
        text_mode: cm.BigValueTextMode = cm.BigValueTextMode.AUTO,
        thresholds: Sequence[tuple[float, str]] | None = None,
        description: str | None = None,
    ) -> Board:
        """`thresholds`: (value, color) steps; the first is the base, which Grafana reads as -Infinity whatever
        its value (Grafana writes null there, Grafana's published schema asks for a number)."""
        p = _common(stat.Panel(), title, [q], self.layout.place(w, h), unit, description)
        p = (
            p.reduce_options(cb.ReduceDataOptions().calcs(["lastNotNull"]).fields("").values(False))
            .color_mode(cm.BigValueColorMode.VALUE)
            .graph_mode(cm.BigValueGraphMode.AREA)
            .text_mode(text_mode)
        )
        if thresholds:
            p = p.thresholds(
                db.ThresholdsConfig()
                .mode(dm.ThresholdsMode.ABSOLUTE)
                .steps([dm.Threshold(value=v, color=c) for v, c in thresholds])
            )
        return self._add(p)

    def series(
        self,
        title: str,
        queries: Sequence[Q],
        w: int,
        h: int = 8,
        unit: str | None = None,
        *,
        description: str | None = None,
        bars: bool = False,
        stacked: bool = False,
    ) -> Board:
        p = _common(timeseries.Panel(), title, queries, self.layout.place(w, h), unit, description)
        p = p.legend(
            cb.VizLegendOptions()
            .display_mode(cm.LegendDisplayMode.LIST)
            .placement(cm.LegendPlacement.BOTTOM)
            .show_legend(True)
        ).tooltip(cb.VizTooltipOptions().mode(cm.TooltipDisplayMode.MULTI).sort(cm.SortOrder.DESCENDING))
        if bars:
            p = p.draw_style(cm.GraphDrawStyle.BARS)
        if stacked:
            p = p.stacking(cb.StackingConfig().mode(cm.StackingMode.NORMAL)).fill_opacity(30)
        return self._add(p)

    def table(self, title: str, q: Q, w: int, h: int = 8, *, description: str | None = None) -> Board:
        pos = self.layout.place(w, h)
        p = _common(table.Panel(), title, [Q(q.expr, q.legend, table=True)], pos, None, description)
        return self._add(p.frame_index(0).show_header(True))

    def row(self, title: str) -> Board:
        self.dashboard = self.dashboard.with_row(db.Row(title).grid_pos(self.layout.row()).collapsed(False))
        return self

    def _add(self, panel) -> Board:
        self.dashboard = self.dashboard.with_panel(panel)
        return self


# -- variables -------------------------------------------------------------------------------------------


def query_variable(name: str, label: str, query: str) -> db.QueryVariable:
    return (
        db.QueryVariable(name)
        .label(label)
        .datasource(DS)
        .query(query)
        .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .multi(True)
        .include_all(True)
        .all_value(".*")
        .current(dm.VariableOption(selected=True, text=["All"], value=["$__all"]))
        .sort(dm.VariableSort.NUMERICAL_ASC)
    )


def base(uid: str, title: str, *extra_variables) -> db.Dashboard:
    d = (
        db.Dashboard(title)
        .uid(uid)
        .tags(["resilient"])
        .editable()
        .time("now-6h", "now")
        .refresh("30s")
        .timezone("")
        .tooltip(dm.DashboardCursorSync.CROSSHAIR)
        .link(
            db.DashboardLink("resilient")
            .type(dm.DashboardLinkType.DASHBOARDS)
            .tags(["resilient"])
            .as_dropdown(True)
            .include_vars(True)
            .keep_time(True)
        )
        .with_variable(db.DatasourceVariable("datasource").label("Prometheus").type("prometheus"))
        .with_variable(query_variable("job", "Job", "label_values(resilient_step, job)"))
        .with_variable(query_variable("node", "Node", 'label_values(resilient_step{job=~"$job"}, node)'))
    )
    for v in extra_variables:
        d = d.with_variable(v)
    return d


# -- the dashboards --------------------------------------------------------------------------------------


def run_overview() -> db.Dashboard:
    by_rank = "{{node}} rank {{rank}}"
    rate = "[$__rate_interval]"
    step_hist = f"rate(resilient_step_time_seconds_bucket{{{JOB_NODE}}}{rate})"
    return (
        Board(
            base(
                "resilient-run",
                "resilient / run overview",
                query_variable("rank", "Rank", f"label_values(resilient_rank_step{{{JOB_NODE}}}, rank)"),
            )
        )
        .row("Progress")
        .stat(
            "State",
            Q(f"max by (state) (resilient_run_state{{{JOB_NODE}}}) == 1", "{{state}}"),
            4,
            4,
            text_mode=cm.BigValueTextMode.NAME,
        )
        .stat("Step", Q(f"max(resilient_step{{{JOB_NODE}}})", "step"), 4, 4)
        .stat("Attempt", Q(f"max(resilient_attempt{{{JOB_NODE}}})", "attempt"), 4, 4)
        .stat("Consumed tokens", Q(f"max(resilient_consumed_tokens{{{JOB_NODE}}})", "tokens"), 4, 4, "short")
        .stat("Goodput", Q(f"max(resilient_goodput_ratio{{{JOB_NODE}}})", "goodput"), 4, 4, "percentunit")
        .stat(
            "Restarts in range", Q(f"max(increase(resilient_restarts_total{{{JOB_NODE}}}[$__range]))", "restarts"), 4, 4
        )
        .series(
            "Loss",
            [
                Q(f"max(resilient_loss{{{JOB_NODE}}})", "train"),
                Q(f"max(resilient_validation_loss{{{JOB_NODE}}})", "validation"),
            ],
            12,
        )
        .series("Throughput", [Q(f"max(resilient_tokens_per_second{{{JOB_NODE}}})", "tokens/s")], 6, unit="short")
        .series("MFU", [Q(f"max(resilient_mfu_ratio{{{JOB_NODE}}})", "MFU")], 6, unit="percentunit")
        .series(
            "Step time",
            [
                Q(f"histogram_quantile(0.5, sum by (le) ({step_hist}))", "p50"),
                Q(f"histogram_quantile(0.99, sum by (le) ({step_hist}))", "p99"),
                Q(
                    f"sum(rate(resilient_step_time_seconds_sum{{{JOB_NODE}}}{rate})) / "
                    f"sum(rate(resilient_step_time_seconds_count{{{JOB_NODE}}}{rate}))",
                    "mean",
                ),
            ],
            8,
            unit="s",
        )
        .series("Learning rate", [Q(f"max(resilient_learning_rate{{{JOB_NODE}}})", "lr")], 8)
        .series("Gradient norm", [Q(f"max(resilient_grad_norm{{{JOB_NODE}}})", "grad norm")], 8)
        .row("Ranks")
        .series(
            "Heartbeat age",
            [Q(f"max by (node, rank) (resilient_heartbeat_age_seconds{{{RANK}}})", by_rank)],
            8,
            unit="s",
            description="Seconds since each rank's last heartbeat; a rising line is a hang.",
        )
        .series(
            "Straggler score",
            [Q(f"max by (node, rank) (resilient_straggler_score{{{RANK}}})", by_rank)],
            8,
            description="Rank step time over the run's median; 1 is typical.",
        )
        .series(
            "Rank step time",
            [Q(f"max by (node, rank) (resilient_rank_step_time_seconds{{{RANK}}})", by_rank)],
            8,
            unit="s",
        )
        .series(
            "Step spread across ranks",
            [Q(f"max(resilient_rank_step{{{RANK}}}) - min(resilient_rank_step{{{RANK}}})", "max - min")],
            8,
            description="Ranks should be on the same step; a growing spread points at a stuck rank.",
        )
        .row("Failures")
        .series(
            "Failures by kind",
            [Q(f"sum by (kind) (increase(resilient_failures_total{{{JOB_NODE}}}{rate}))", "{{kind}}")],
            12,
            bars=True,
            description="Each failure's evidence (stacks, culprit rank) is in "
            "RUN_DIR/incidents/<attempt>-<kind>/; `resilient status RUN_DIR` names it.",
        )
        .series(
            "Restarts", [Q(f"max(increase(resilient_restarts_total{{{JOB_NODE}}}{rate}))", "restarts")], 12, bars=True
        )
        .row("Nodes")
        .stat(
            "Spare nodes left",
            Q(f"max(resilient_spare_nodes_available{{{JOB_NODE}}})", "spares"),
            4,
            4,
            description="Healthy spares ready to take a failed node's place in-job (0 with "
            "spares configured: ResilientNoSpareNodeLeft).",
        )
        .stat(
            "Bad nodes",
            Q(f"max(resilient_bad_nodes{{{JOB_NODE}}})", "bad nodes"),
            4,
            4,
            description="Nodes taken out of the run in this allocation; `resilient status` "
            "lists them with why, when and how often.",
        )
        .series(
            "Node replacements",
            [Q(f"max(increase(resilient_node_replacements_total{{{JOB_NODE}}}{rate}))", "replaced")],
            16,
            h=4,
            bars=True,
            description="A spare took a lost or unhealthy node's place (same node rank).",
        )
        .dashboard
    )


def checkpoints_goodput() -> db.Dashboard:

    def mean(metric: str) -> str:
        return f"increase({metric}_sum{{{JOB_NODE}}}[$__range]) / increase({metric}_count{{{JOB_NODE}}}[$__range])"

    return (
        Board(base("resilient-goodput", "resilient / checkpoints and goodput"))
        .row("Goodput")
        .stat("Goodput", Q(f"max(resilient_goodput_ratio{{{JOB_NODE}}})", "goodput"), 6, 5, "percentunit")
        .stat("Productive time", Q(f"max(resilient_productive_seconds{{{JOB_NODE}}})", "productive"), 6, 5, "s")
        .stat("Wall time", Q(f"max(resilient_run_wall_seconds{{{JOB_NODE}}})", "wall"), 6, 5, "s")
        .stat(
            "Failed checkpoint saves",
            Q(f"max(resilient_checkpoint_save_failures_total{{{JOB_NODE}}})", "failed saves"),
            6,
            5,
        )
        .series(
            "Goodput over time", [Q(f"max(resilient_goodput_ratio{{{JOB_NODE}}})", "goodput")], 12, unit="percentunit"
        )
        .series(
            "Badput by category",
            [Q(f"max by (category) (resilient_badput_seconds{{{JOB_NODE}}})", "{{category}}")],
            12,
            stacked=True,
        )
        .row("Checkpoints")
        .stat("Last complete checkpoint", Q(f"max(resilient_checkpoint_last_step{{{JOB_NODE}}})", "step"), 6, 5)
        .stat(
            "Checkpoint age", Q(f"min(resilient_checkpoint_last_complete_age_seconds{{{JOB_NODE}}})", "age"), 6, 5, "s"
        )
        .stat(
            "Completed at",
            Q(f"max(resilient_checkpoint_last_complete_timestamp_seconds{{{JOB_NODE}}}) * 1000", "completed"),
            6,
            5,
            "dateTimeFromNow",
        )
        .stat("Checkpoint size", Q(f"max(resilient_checkpoint_size_bytes{{{JOB_NODE}}})", "size"), 6, 5, "bytes")
        .series(
            "Save time (mean over the range)",
            [
                Q(f"max({mean('resilient_checkpoint_save_blocking_seconds')})", "blocking"),
                Q(f"max({mean('resilient_checkpoint_save_total_seconds')})", "total"),
            ],
            8,
            unit="s",
        )
        .series(
            "Checkpoint age vs limit",
            [
                Q(f"min(resilient_checkpoint_last_complete_age_seconds{{{JOB_NODE}}})", "age"),
                Q(f"max(resilient_checkpoint_age_limit_seconds{{{JOB_NODE}}})", "alert limit"),
            ],
            8,
            unit="s",
        )
        .series(
            "Checkpoint write rate",
            [Q(f"max(rate(resilient_checkpoint_written_bytes_total{{{JOB_NODE}}}[$__rate_interval]))", "written")],
            8,
            unit="Bps",
        )
        .series(
            "Checkpoint interval (steps; adaptive: Daly)",
            [Q(f"max by (tier) (resilient_checkpoint_interval_steps{{{JOB_NODE}}})", "{{tier}}")],
            8,
        )
        .dashboard
    )


def gpu_node_health() -> db.Dashboard:
    per_gpu = "{{node}} gpu {{gpu}}"

    def nvml(metric: str, by: str = "node, gpu") -> str:
        return gated("nvml", f"max by ({by}) ({metric}{{{GPU}}})")

    def dc(field: str, fn: Callable[[str], str] = lambda s: s) -> str:
        return gated("dcgm", dcgm(field, fn=fn))

    def rate(s: str) -> str:  # DCGM violation counters are microseconds: per second of wall time, a ratio
        return f"rate({s}[$__rate_interval]) / 1e6"

    source = (
        db.CustomVariable("gpu_source")
        .label("GPU metrics")
        .values("nvml : 1, dcgm-exporter : 2")
        .current(dm.VariableOption(selected=True, text="nvml", value="1"))
        .description("resilient's own NVML metrics, or NVIDIA dcgm-exporter's DCGM_FI_* fields")
    )
    gpu = query_variable(
        "gpu", "GPU", 'label_values({__name__=~"resilient_gpu_temperature_celsius|DCGM_FI_DEV_GPU_TEMP"}, gpu)'
    )
    facts_job = query_variable("facts_job", "Node facts job", "label_values(resilient_node_health_verdict, job)")

    def fact(metric: str, name: str) -> str:  # one table row per (node, gpu, fact)
        return f'label_replace(max by (node, gpu) ({metric}{{{FACTS}}}), "fact", "{name}", "", "")'

    board = (
        Board(base("resilient-health", "resilient / GPU and node health", source, gpu, facts_job))
        .row("Node facts (kept after the supervisor exits)")
        .stat(
            "Unhealthy nodes",
            Q(
                f'count(max by (node) (resilient_node_health_verdict{{{FACTS}, verdict="unhealthy"}})) or vector(0)',
                "unhealthy",
            ),
            6,
            8,
            thresholds=[(0, "green"), (1, "red")],
            description="Nodes whose last health verdict is unhealthy: the ResilientNodeUnhealthy alert.",
        )
        .table(
            "Last health verdict per node",
            Q(f"max by (node, verdict, check, reason) (resilient_node_health_verdict{{{FACTS}}})"),
            18,
            description="Written by each node's supervisor (and `resilient health check`) for node_exporter; "
            "it stays after the supervisor exits and the job moves to other nodes.",
        )
        .table(
            "GPU faults at the last verdict",
            Q(
                f"{fact('resilient_gpu_last_xid', 'last XID')} "
                f"or {fact('resilient_gpu_ecc_uncorrectable_errors', 'uncorrectable ECC errors')} "
                f"or {fact('resilient_gpu_lost', 'lost')} "
                f"or {fact('resilient_gpu_row_remap_failed', 'row remap failed')}"
            ),
            12,
        )
        .table(
            "Last supervisor exit per node",
            Q(f"max by (node, outcome, reason) (resilient_supervisor_exit_code{{{FACTS}}})"),
            12,
            description="Exit code (value), its name and reason: why each node's last supervisor stopped.",
        )
        .row("Nodes")
        .stat(
            "Node health (0 ok, 1 warn, 2 fatal)",
            Q(f"max by (node) (resilient_node_health_severity{{{JOB_NODE}}})", "{{node}}"),
            12,
            5,
            thresholds=[(0, "green"), (1, "orange"), (2, "red")],
        )
        .stat("Metrics targets up", Q('up{job=~"$job"}', "{{instance}}"), 12, 5)
        .table("Health checks", Q(f"max by (node, check) (resilient_health_check_severity{{{JOB_NODE}}})"), 12)
        .series(
            "Collective bus bandwidth",
            [Q(f"max by (node) (resilient_collective_bus_bandwidth_bytes_per_second{{{JOB_NODE}}})", "{{node}}")],
            12,
            unit="Bps",
        )
        .row("GPUs")
        .series(
            "Temperature",
            [Q(nvml("resilient_gpu_temperature_celsius"), per_gpu), Q(dc("DCGM_FI_DEV_GPU_TEMP"), per_gpu)],
            8,
            unit="celsius",
        )
        .series(
            "Power",
            [Q(nvml("resilient_gpu_power_watts"), per_gpu), Q(dc("DCGM_FI_DEV_POWER_USAGE"), per_gpu)],
            8,
            unit="watt",
        )
        .series(
            "Throttling",
            [
                Q(nvml("resilient_gpu_throttle_active", "node, gpu, reason"), per_gpu + " {{reason}}"),
                Q(dc("DCGM_FI_DEV_THERMAL_VIOLATION", rate), per_gpu + " thermal"),
                Q(dc("DCGM_FI_DEV_POWER_VIOLATION", rate), per_gpu + " power"),
            ],
            8,
            description="NVML: 1 while throttled for the reason; dcgm-exporter: share of time throttled.",
        )
        .series(
            "Uncorrectable ECC errors",
            [
                Q(nvml("resilient_gpu_ecc_uncorrectable_errors"), per_gpu),
                Q(dc("DCGM_FI_DEV_ECC_DBE_VOL_TOTAL"), per_gpu),
            ],
            8,
        )
        .series("Last XID", [Q(nvml("resilient_gpu_last_xid"), per_gpu), Q(dc("DCGM_FI_DEV_XID_ERRORS"), per_gpu)], 8)
        .series(
            "Row remap pending / failed, GPU lost",
            [
                Q(nvml("resilient_gpu_row_remap_pending"), per_gpu + " remap pending"),
                Q(nvml("resilient_gpu_row_remap_failed"), per_gpu + " remap failed"),
                Q(nvml("resilient_gpu_lost"), per_gpu + " lost"),
                Q(dc("DCGM_FI_DEV_ROW_REMAP_PENDING"), per_gpu + " remap pending"),
                Q(dc("DCGM_FI_DEV_ROW_REMAP_FAILURE"), per_gpu + " remap failed"),
            ],
            8,
        )
    )
    for title, metric, unit, note in _DCGM_ONLY:
        board = board.series(
            f"{title} (dcgm-exporter)", [Q(dc(metric), per_gpu)], 12, unit=unit, description="dcgm-exporter only" + note
        )
    return board.dashboard


_DCGM_ONLY = (
    ("Utilization", "DCGM_FI_DEV_GPU_UTIL", "percent", ": NVML metrics carry no utilization."),
    ("Framebuffer used", "DCGM_FI_DEV_FB_USED", "decmbytes", " (MiB)."),
)
"""GPU panels only dcgm-exporter feeds: (title, metric, unit, what the description adds)."""


DASHBOARDS = {
    "run-overview.json": run_overview,
    "checkpoints-goodput.json": checkpoints_goodput,
    "gpu-node-health.json": gpu_node_health,
}


def render(name: str) -> str:
    """The JSON text of dashboard `name` (panels numbered in order, stable key order)."""
    model = json.loads(JSONEncoder().encode(DASHBOARDS[name]().build()))
    for i, panel in enumerate(model["panels"], start=1):
        panel["id"] = i
    for var in model["templating"]["list"]:  # the SDK fills interval-variable fields into every kind
        for key in ("auto", "auto_count", "auto_min"):
            var.pop(key, None)
    return json.dumps(model, indent=2, sort_keys=True) + "\n"


def main(argv: list[str]) -> int:
    check = "--check" in argv
    stale = []
    for name in DASHBOARDS:
        text, path = render(name), OUT / name
        if check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
    if stale:
        print(f"grafana/generate.py: out of date: {', '.join(stale)} (run python grafana/generate.py)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
