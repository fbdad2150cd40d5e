"""The results table (terminal and Markdown) and bench/RESULTS.md."""

from __future__ import annotations

import datetime as _dt
import platform
import re
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "RESULTS.md"
ANALYSIS_BEGIN = "<!-- analysis:begin (hand-written; python -m bench keeps this block) -->"
ANALYSIS_END = "<!-- analysis:end -->"


@dataclass
class Row:
    section: str
    name: str
    value: float | None  # None: could not be measured
    unit: str
    ratio: float | None = None  # value relative to the reference of its section
    target: str = ""  # e.g. ">= 2.0x nginx TLS"
    ok: bool | None = None  # None: informational
    note: str = ""

    @property
    def status(self) -> str:
        if self.ok is None:
            return ""
        return "PASS" if self.ok else "MISS"

    def cells(self) -> list[str]:
        note = " ".join(self.note.split())  # curl's error text spans lines
        return [self.name, fmt(self.value, self.unit), f"{self.ratio:.2f}x" if self.ratio is not None else "", self.target, self.status, note]


HEADERS = ["measurement", "value", "ratio", "target", "result", "notes"]


def fmt(value, unit: str) -> str:
    if value is None:
        return "n/a"
    if unit == "MB/s":
        return f"{value:,.0f} MB/s"
    if unit == "s":
        return f"{value:.2f} s" if value < 100 else f"{value:.0f} s"
    if unit == "MiB":
        return f"{value:.1f} MiB"
    if unit == "x":
        return f"{value:.2f}x"
    if unit == "%":
        return f"{value:.0f} %"
    if unit == "requests":
        return f"{value:g} requests"
    if unit == "ms":
        return f"{value:.2f} ms"
    if unit == "req/s":
        return f"{value:,.0f} req/s"
    if unit == "CPU-s":
        return f"{value:.1f} CPU-s"
    if unit == "GETs":
        return f"{int(value)} {unit}"
    if unit == "x":
        return f"{value:.2f}x"
    if unit == "CPU s":
        return f"{value:.2f} CPU s"
    return f"{value} {unit}"


def by_section(rows: list[Row]) -> list[Row]:
    """Rows grouped by section (sections are numbered), in measurement order within each."""
    return sorted(rows, key=lambda r: r.section.split(".", 1)[0])


def markdown_table(rows: list[Row]) -> str:
    rows = by_section(rows)
    out = []
    section = None
    for r in rows:
        if r.section != section:
            if out:
                out.append("")
            out.append(f"**{r.section}**")
            out.append("")
            out.append("| " + " | ".join(HEADERS) + " |")
            out.append("|" + "|".join("---" for _ in HEADERS) + "|")
            section = r.section
        out.append("| " + " | ".join(c.replace("|", "\\|") for c in r.cells()) + " |")
    return "\n".join(out)


def text_table(rows: list[Row]) -> str:
    rows = by_section(rows)
    cols = [HEADERS] + [r.cells() for r in rows]
    widths = [max(len(c[i]) for c in cols) for i in range(len(HEADERS) - 1)]
    lines = []
    section = None
    for r in rows:
        if r.section != section:
            lines.append("")
            lines.append(f"== {r.section}")
            lines.append("  " + "  ".join(h.ljust(w) for h, w in zip(HEADERS, widths)) + "  notes")
            section = r.section
        c = r.cells()
        lines.append("  " + "  ".join(c[i].ljust(widths[i]) for i in range(len(widths))) + "  " + c[-1])
    return "\n".join(lines)


def targets_summary(rows: list[Row]) -> str:
    judged = [r for r in by_section(rows) if r.ok is not None]
    missed = [r for r in judged if not r.ok]
    lines = [f"{len(judged) - len(missed)} of {len(judged)} targets met."]
    for r in missed:
        lines.append(f"- MISS: {r.section} / {r.name}: {fmt(r.value, r.unit)}" + (f" ({r.ratio:.2f}x)" if r.ratio is not None else "") + f", target {r.target}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- machine


def _cmd(argv) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"


def machine_info(mitmdump: str) -> dict[str, str]:
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = "?"
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    mitm = _cmd([mitmdump, "--version"])
    versions = dict(l.split(":", 1) for l in mitm.splitlines() if ":" in l)
    os_name = "?"
    if Path("/etc/os-release").exists():
        m = re.search(r'^PRETTY_NAME="?([^"\n]*)', Path("/etc/os-release").read_text(), re.M)
        os_name = m.group(1) if m else "?"
    return {
        "nproc": _cmd(["nproc"]),
        "CPU": cpu,
        "RAM": mem,
        "kernel": platform.release(),
        "OS": os_name,
        "Python (regcache / mitmdump)": versions.get("Python", "?").strip(),
        "mitmproxy": versions.get("Mitmproxy", "?").strip(),
        "OpenSSL (mitmproxy)": versions.get("OpenSSL", "?").strip(),
        "Python (bench driver)": platform.python_version(),
        "nginx": (_cmd(["nginx", "-v"]) or subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr.strip()).removeprefix("nginx version: "),
        "docker-registry": _cmd(["docker-registry", "--version"]).removeprefix("docker-registry "),
        "curl": _cmd(["curl", "--version"]).splitlines()[0] if _cmd(["curl", "--version"]) else "?",
        "skopeo": _cmd(["skopeo", "--version"]),
    }


# --------------------------------------------------------------------------- RESULTS.md


def existing_analysis(path: Path = RESULTS) -> str | None:
    if not path.exists():
        return None
    text = path.read_text()
    if ANALYSIS_BEGIN in text and ANALYSIS_END in text:
        return text.split(ANALYSIS_BEGIN, 1)[1].split(ANALYSIS_END, 1)[0].strip("\n")
    return None


def write_results(
    rows: list[Row],
    machine: dict[str, str],
    command: str,
    started: _dt.datetime,
    elapsed: float,
    details: list[str],
    profiles: list[str],
    path: Path = RESULTS,
    title: str = "regcache benchmark results",
) -> Path:
    analysis = existing_analysis(path) or "_No analysis written yet: run it, read the profiles below, write here what limits each missed target._"
    parts = [
        f"# {title}",
        "",
        "Written by `python -m bench` (issue 4); everything outside the marked analysis block is",
        "regenerated on every run. Throughput is in MB/s = 10^6 bytes/s.",
        "",
        f"- date: {started.strftime('%Y-%m-%d %H:%M:%S %Z').strip()} (took {elapsed:.0f} s)",
        f"- command: `{command}`",
        "",
        "| machine | |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in machine.items()],
        "",
        "## Results",
        "",
        markdown_table(rows),
        "",
        "## Targets",
        "",
        targets_summary(rows),
        "",
        "## How each figure is taken",
        "",
        *details,
        "",
        "## Analysis",
        "",
        ANALYSIS_BEGIN,
        analysis,
        ANALYSIS_END,
        "",
    ]
    if profiles:
        parts += ["## Profiles of this run (py-spy, missed targets)", "", *profiles, ""]
    path.write_text("\n".join(parts))
    return path


def profile_markdown(title: str, summary: dict, raw_path: Path, rate: int, cpu_note: str = "") -> str:
    lines = [f"### {title}", "", f"raw collapsed stacks: `{raw_path}` ({rate} Hz; speedscope or flamegraph.pl read it). {cpu_note}".rstrip(), ""]
    for t in summary["threads"][:3]:
        if t["busy"] < 20:
            continue
        lines.append(f"thread `{t['thread']}`: {t['samples']} samples, {t['busy']} busy (the rest parked in epoll / a pool's queue); inclusive leaves out the thread/event-loop scaffolding")
        lines.append("")
        lines.append("self time by package: " + ", ".join(f"{name} {100 * n / t['busy']:.0f} %" for name, n in t["pkg"][:8]))
        lines.append("")
        lines.append("| self % of busy | function | | inclusive % of busy | function |")
        lines.append("|---:|---|---|---:|---|")
        for i in range(max(len(t["self"]), len(t["incl"]))):
            s = t["self"][i] if i < len(t["self"]) else ("", 0)
            c = t["incl"][i] if i < len(t["incl"]) else ("", 0)
            sp = f"{100 * s[1] / t['busy']:.1f}" if s[0] else ""
            cp = f"{100 * c[1] / t['busy']:.1f}" if c[0] else ""
            lines.append(f"| {sp} | `{s[0]}` | | {cp} | `{c[0]}` |")
        lines.append("")
    return "\n".join(lines)


def rows_json(rows: list[Row]) -> list[dict]:
    return [asdict(r) | {"status": r.status} for r in rows]
