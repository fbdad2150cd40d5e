"""The `regcache` command: look into, warm, move, prune and check a cache directory; print
client configuration; manage the CA.

Every command works on a cache directory (--dir, default ./regcache-cache like the addon's
regcache_dir, or $REGCACHE_DIR) and is safe while a proxy runs on the same directory: the
store is process-safe, and reading it for ls/stats/gc/verify never counts as a use.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
import time

from . import cacerts, clientconfig, inventory, layout
from .config import ConfigError, load_config, parse_size
from .metrics import human, store_summary
from .stats import Stats
from .store import DEFAULT_SIZE_LIMIT, Store

DEFAULT_DIR_NAME = "regcache-cache"
DEFAULT_CERTS = "certs"


class CLIError(Exception):
    pass


# --- progress --------------------------------------------------------------------------------


class Progress:
    """A one-line progress bar on stderr (only on a terminal, unless forced)."""

    WIDTH = 28

    def __init__(self, label: str, total: int | None = None, unit: str = "B", enabled: bool | None = None, stream=None):
        self.stream = stream or sys.stderr
        if enabled is None:
            enabled = self.stream.isatty() and os.environ.get("REGCACHE_PROGRESS", "1") != "0"
        self.enabled = enabled
        self.label = label
        self.total = total
        self.unit = unit
        self.done = 0
        self.started = time.monotonic()
        self._last = 0.0
        self._shown = False

    def set_total(self, total: int) -> None:
        self.total = total
        self._draw(force=True)

    def advance(self, n: int) -> None:
        self.done += n
        self._draw()

    def update(self, done: int, total: int | None = None, label: str | None = None) -> None:
        self.done = done
        if total is not None:
            self.total = total
        if label is not None:
            self.label = label
        self._draw()

    def _fmt(self, n: float) -> str:
        return human(n) if self.unit == "B" else f"{int(n)}"

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-6)
        rate = self.done / elapsed
        if self.total:
            frac = min(1.0, self.done / self.total)
            filled = int(frac * self.WIDTH)
            bar = "#" * filled + "-" * (self.WIDTH - filled)
            text = f"{self.label[:32]:<32} [{bar}] {frac * 100:5.1f}% {self._fmt(self.done)}/{self._fmt(self.total)}"
        else:
            text = f"{self.label[:32]:<32} {self._fmt(self.done)}"
        if self.unit == "B":
            text += f" {human(rate)}/s"
        return text

    def _draw(self, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._last < 0.1:
            return
        self._last = now
        self.stream.write("\r\x1b[K" + self.line())
        self.stream.flush()
        self._shown = True

    def close(self) -> None:
        if self.enabled and self._shown:
            self._draw(force=True)
            self.stream.write("\n")
            self.stream.flush()


# --- helpers --------------------------------------------------------------------------------------


def default_dir() -> str:
    return os.environ.get("REGCACHE_DIR") or os.path.join(os.getcwd(), DEFAULT_DIR_NAME)


def _persisted_size_limit(directory: str) -> int | None:
    db = os.path.join(directory, "content", "cache.db")
    if not os.path.exists(db):
        return None
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10) as con:
            row = con.execute("SELECT value FROM Settings WHERE key = 'size_limit'").fetchone()
            return int(row[0]) if row else None
    except sqlite3.Error:
        return None


def open_store(args, must_exist: bool = True) -> Store:
    directory = os.path.abspath(args.dir)
    if must_exist and not os.path.isdir(os.path.join(directory, "content")):
        raise CLIError(f"no cache at {directory} (give --dir, or set REGCACHE_DIR)")
    limit = None
    tier_config = None
    if args.config:
        config = load_config(args.config)
        limit, tier_config = config.size_limit, config.tier
    if limit is None:
        # keep the limit the proxy last set instead of overwriting it with a default
        limit = _persisted_size_limit(directory) or DEFAULT_SIZE_LIMIT
    store = Store(directory, limit)
    if tier_config is not None and getattr(args, "command", None) in ("export", "import"):
        from .tier import Tier

        store.shared = Tier(tier_config)  # export reads the tier, import writes to it
        store.shared.ensure_bucket()
    return store


def progress_for(args, label: str, total: int | None = None, unit: str = "B") -> Progress:
    enabled = False if args.quiet or args.no_progress else None
    return Progress(label, total, unit, enabled=enabled)


def ago(t: float | None, now: float | None = None) -> str:
    if not t:
        return "never"
    d = max(0.0, (now or time.time()) - t)
    for unit, secs in (("d", 86400), ("h", 3600), ("m", 60)):
        if d >= secs:
            return f"{int(d // secs)}{unit} ago"
    return f"{int(d)}s ago"


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def table(rows: list[list[str]], header: list[str]) -> str:
    cols = list(zip(*([header] + rows))) if rows else [[h] for h in header]
    widths = [max(len(str(c)) for c in col) for col in cols]
    out = ["  ".join(str(h).ljust(w) for h, w in zip(header, widths)).rstrip()]
    for r in rows:
        out.append("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
    return "\n".join(out)


def say(args, text: str = "") -> None:
    print(text)


def note(args, text: str) -> None:
    if not args.quiet:
        print(text, file=sys.stderr)


# --- stats -------------------------------------------------------------------------------------------


def cmd_stats(args) -> int:
    store = open_store(args)
    stats = Stats(store.counters)
    if args.reset:
        n = stats.reset()
        say(args, f"statistics reset ({n} counters removed)")
        return 0
    snap = stats.snapshot()
    summary = store_summary(store)
    if args.json:
        print(json.dumps({"directory": store.directory, **snap.as_dict(), "store": summary}, indent=2))
        return 0
    say(
        args,
        f"regcache {store.directory}"
        + (f" — counting since {time.strftime('%Y-%m-%d %H:%M', time.localtime(snap.since))}" if snap.since else ""),
    )
    say(args)
    rows = [
        [name, r.requests, r.hits, r.misses, r.other, pct(r.hit_ratio), human(r.upstream_bytes)]
        for name, r in sorted(snap.registries.items())
    ]
    rows.append(
        [
            "total",
            snap.hits + snap.misses + snap.other,
            snap.hits,
            snap.misses,
            snap.other,
            pct(snap.hit_ratio),
            human(snap.upstream_bytes),
        ]
    )
    say(
        args,
        table(
            [[str(c) for c in r] for r in rows],
            ["registry", "requests", "hits", "misses", "other", "hit ratio", "from upstream"],
        ),
    )
    say(args)
    say(args, f"bytes served to clients   {human(snap.served_bytes)}")
    say(args, f"  read from the store     {human(snap.cache_bytes)}")
    say(args, f"  fetched from upstream   {human(snap.upstream_bytes)}")
    say(args, f"  saved (served - fetched) {human(snap.saved_bytes)}")
    say(args)
    limit = summary["limit"] or 1
    say(
        args,
        f"store {human(summary['size'])} of {human(summary['limit'])} ({100 * summary['size'] / limit:.1f}%): "
        f"{summary['blobs']} blobs, {summary['manifests']} manifests, {summary['tags']} tags, {summary['pins']} pinned",
    )
    if snap.evictions or snap.verify_failures:
        say(
            args,
            f"evicted {snap.evictions} entries ({human(snap.evicted_bytes)}); {snap.verify_failures} "
            "verification failures",
        )
    top = snap.top_images(5)
    if top:
        say(args)
        say(args, "top images: " + ", ".join(f"{reg}/{repo} ({n})" for reg, repo, n in top))
    return 0


# --- ls -----------------------------------------------------------------------------------------------


def image_records(store: Store) -> list[dict]:
    inv = inventory.Inventory(store)
    pinned = {(p.registry, p.repo, p.reference) for p in inventory.pins(store)}
    out = []
    for t in inventory.tagged_images(store):
        if t.digest in inv.manifests:
            manifests, blobs, missing = inv.closure(t.digest)
            size = inv.size_of(manifests, blobs)
            last = inv.last_access(manifests, blobs)
            missing_blobs = [
                d
                for d in missing
                if d not in inv.manifests and not any(d == c for m in manifests for c, _mt, _p in inv.refs(m).manifests)
            ]
            state = "complete" if not missing_blobs else f"partial ({len(missing_blobs)} blobs missing)"
        else:
            size, last, state = 0, 0.0, "manifest evicted"
        out.append(
            {
                "registry": t.registry,
                "repo": t.repo,
                "tag": t.tag,
                "digest": t.digest,
                "media_type": t.media_type,
                "size": size,
                "last_access": last,
                "checked_at": t.checked_at,
                "state": state,
                "pinned": (t.registry, t.repo, t.tag) in pinned or (t.registry, t.repo, t.digest) in pinned,
            }
        )
    return out


def cmd_ls(args) -> int:
    store = open_store(args)
    records = image_records(store)
    registry, repo = None, None
    if args.what:
        registry, _, repo = args.what.partition("/")
        from .oci import canonical_registry, normalise_name

        registry = canonical_registry(registry)
        repo = normalise_name(registry, repo) if repo else None
        records = [
            r
            for r in records
            if r["registry"] == registry and (repo is None or r["repo"] == repo or r["repo"].startswith(repo + "/"))
        ]
    if args.json:
        print(json.dumps(records, indent=2))
        return 0
    if not records:
        say(args, "nothing cached" + (f" under {args.what}" if args.what else ""))
        return 0
    now = time.time()
    if args.all or repo is not None:
        rows = [
            [
                f"{r['registry']}/{r['repo']}:{r['tag']}",
                r["digest"][:19] + "…",
                short_type(r["media_type"]),
                human(r["size"]),
                ago(r["last_access"], now),
                r["state"] + (", pinned" if r["pinned"] else ""),
            ]
            for r in records
        ]
        say(args, table(rows, ["image", "digest", "type", "size", "last access", "state"]))
    elif registry is not None:
        groups: dict[str, list[dict]] = {}
        for r in records:
            groups.setdefault(r["repo"], []).append(r)
        rows = [
            [
                f"{registry}/{name}",
                str(len(rs)),
                human(max(x["size"] for x in rs)),
                ago(max(x["last_access"] for x in rs), now),
            ]
            for name, rs in sorted(groups.items())
        ]
        say(args, table(rows, ["repository", "tags", "largest", "last access"]))
    else:
        groups = {}
        for r in records:
            groups.setdefault(r["registry"], []).append(r)
        rows = [
            [name, str(len({x["repo"] for x in rs})), str(len(rs)), ago(max(x["last_access"] for x in rs), now)]
            for name, rs in sorted(groups.items())
        ]
        say(args, table(rows, ["registry", "repositories", "tags", "last access"]))
        summary = store_summary(store)
        say(
            args,
            f"\nstore {human(summary['size'])}: {summary['blobs']} blobs, {summary['manifests']} manifests "
            "(regcache ls REGISTRY[/REPO] for more, -a for every tag)",
        )
    return 0


def short_type(media_type: str) -> str:
    return {
        "application/vnd.oci.image.index.v1+json": "oci-index",
        "application/vnd.oci.image.manifest.v1+json": "oci",
        "application/vnd.docker.distribution.manifest.list.v2+json": "docker-list",
        "application/vnd.docker.distribution.manifest.v2+json": "docker-v2",
        "application/vnd.docker.distribution.manifest.v1+prettyjws": "docker-v1",
        "application/vnd.docker.distribution.manifest.v1+json": "docker-v1",
    }.get(media_type, media_type)


# --- warm ------------------------------------------------------------------------------------------------


def _upstream(args):
    from .upstream import Upstream, make_ssl_context

    ca = args.upstream_ca or os.environ.get("SSL_CERT_FILE") or None
    proxy = None
    if not args.mirror and getattr(args, "config", None):
        # the proxy's own way out (upstream_proxy): warm reaches registries as the proxy does;
        # a --mirror is the cache itself, reached directly
        proxy = load_config(args.config).upstream_proxy
    return Upstream(make_ssl_context(args.insecure, ca, None), timeout=args.timeout, backoff=0.0, proxy=proxy)


def cmd_warm(args) -> int:
    from .warm import Warmer, images_from_misses

    images = list(args.images)
    for path in args.file or []:
        with open(path, encoding="utf-8") as f:
            images += [line.split("#", 1)[0].strip() for line in f if line.split("#", 1)[0].strip()]
    for path in args.from_misses or []:
        images += images_from_misses(path)
    images = list(dict.fromkeys(images))
    if not images:
        raise CLIError("nothing to warm: name images, or give --file LIST or --from-misses misses.jsonl")
    mirror = None
    store = None
    stats = None
    if args.mirror:
        cache = clientconfig.parse_cache(args.mirror)
        mirror = (cache.host, cache.port or clientconfig.MIRROR_PORT)
    else:
        store = open_store(args, must_exist=False)
        stats = Stats(store.counters)
    credentials = None
    if args.username:
        password = os.environ.get("REGCACHE_PASSWORD")
        if password is None:
            import getpass

            password = getpass.getpass(f"password for {args.username}: ")
        credentials = (args.username, password)
    bar = progress_for(args, "warming")
    warmer = Warmer(
        _upstream(args),
        store,
        args.platform or ["linux/amd64"],
        mirror=mirror,
        jobs=args.jobs,
        stats=stats,
        progress=lambda done, total, label: bar.update(done, total, label),
        credentials=credentials,
    )
    note(
        args,
        f"warming {len(images)} image(s) "
        + (f"through the cache at {mirror[0]}:{mirror[1]}" if mirror else f"into {store.directory}")
        + f" for {', '.join(args.platform or ['linux/amd64'])}",
    )
    try:
        report = warmer.run(images)
    finally:
        bar.close()
        if store is not None:
            store.close()
    say(
        args,
        f"warmed {len(report.images)} of {len(images)} image(s) in {report.seconds:.1f}s: {report.manifests} "
        "manifests, "
        f"{report.blobs_fetched} blobs fetched ({human(report.bytes_fetched)}), {report.blobs_cached} already cached",
    )
    for ref, why in report.failed:
        say(args, f"  failed {ref}: {why}")
    return 1 if report.failed else 0


# --- export / import ------------------------------------------------------------------------------------------


def cmd_export(args) -> int:
    store = open_store(args, must_exist=not (args.config and load_config(args.config).tier))
    if store.shared is not None:
        from .tier import hydrate

        manifests, blobs = hydrate(store.shared, store, args.images)
        note(args, f"from the tier: {manifests} manifest(s), {blobs} blob(s) fetched and verified")
    bar = progress_for(args, "exporting")
    try:
        report = layout.export(store, args.images, args.output, progress=bar.advance, total_cb=bar.set_total)
    except (layout.LayoutError, ValueError) as e:
        raise CLIError(str(e)) from None
    finally:
        bar.close()
    for w in report.warnings:
        note(args, "warning: " + w)
    say(
        args,
        f"exported {len(report.images)} image(s) to {args.output}: {report.blobs_written} blobs written "
        f"({human(report.bytes_written)}), {report.blobs_present} already there",
    )
    for name in report.images:
        say(args, f"  oci:{os.path.abspath(args.output)}:{name}")
    if report.docker_typed:
        note(
            args,
            f"note: {', '.join(report.docker_typed)} {'is' if len(report.docker_typed) == 1 else 'are'} "
            "Docker-typed (kept byte for byte): "
            "skopeo's oci: transport resolves names of OCI-typed images only, and reads a Docker-typed one "
            "from a bundle "
            "that holds it alone (skopeo copy oci:BUNDLE …); regcache import reads them all",
        )
    return 0


def cmd_import(args) -> int:
    store = open_store(args, must_exist=False)
    bar = progress_for(args, "importing")
    public = True if args.public else (False if args.private else None)
    try:
        report = layout.import_bundle(
            store, args.bundle, name=args.name, mark_public=public, progress=bar.advance, total_cb=bar.set_total
        )
        if store.shared is not None:
            from .tier import publish_bundle

            note(args, f"to the tier: {publish_bundle(store.shared, store, args.bundle)} blob(s) uploaded")
    except (layout.LayoutError, ValueError, OSError) as e:
        raise CLIError(str(e)) from None
    finally:
        bar.close()
        store.close()
    say(
        args,
        f"imported {len(report.images)} image(s) into {store.directory}: {report.manifests} manifests, "
        f"{report.blobs_imported} blobs ({human(report.bytes_imported)}) verified and stored, "
        f"{report.blobs_present} already cached",
    )
    for name in report.images:
        say(args, f"  {name}")
    for name, why in report.skipped:
        say(args, f"  skipped {name}: {why}")
    if report.marked_public:
        say(args, f"  recorded as public (--public, until upstream says otherwise): {', '.join(report.marked_public)}")
    if report.said_public:
        note(
            args,
            f"note: the bundle calls {', '.join(report.said_public)} public; not taken on its word. Offline, "
            "anonymous clients get them only if you vouch for it: import again with --public",
        )
    return 1 if report.skipped else 0


# --- gc / pin ---------------------------------------------------------------------------------------------------


def cmd_gc(args) -> int:
    store = open_store(args)
    limit = args.max_size if args.max_size is not None else store.size_limit
    if not any(store_summary(store)[kind] for kind in ("blobs", "manifests", "tags")):
        say(args, f"nothing to do: the store at {store.directory} is empty, nothing cached yet (limit {human(limit)})")
        return 0
    stats = Stats(store.counters)
    result = inventory.gc(store, limit, dry_run=args.dry_run, stats=stats)
    verb = "would remove" if args.dry_run else "removed"
    if not result.removed_manifests and not result.removed_blobs:
        say(
            args,
            (
                f"nothing to do: store {human(result.before)} is within {human(limit)}"
                if result.before <= limit
                else f"nothing more can go: store {human(result.before)} > {human(limit)}, but everything "
                     "left is pinned"
            ),
        )
        return 0
    say(
        args,
        f"{verb} {len(result.removed_manifests)} manifests and {len(result.removed_blobs)} blobs, "
        f"{human(result.removed_bytes)}; "
        f"store {human(result.before)} -> {human(result.after)} (limit {human(limit)})",
    )
    for ref in result.removed_images:
        say(args, f"  {verb} {ref}")
    if result.protected:
        say(args, f"  kept {result.protected} pinned manifest(s)")
    if result.after > limit:
        say(args, "  still over the limit: the rest is pinned or in use")
    return 0


def cmd_tier_gc(args) -> int:
    from .tier import Tier, shared_gc

    config = load_config(args.config) if args.config else None
    if config is None or config.tier is None:
        raise CLIError("tier-gc needs --config with a tier: section")
    report = shared_gc(Tier(config.tier), args.max_size, args.grace, args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    say(args, f"bucket {config.tier.bucket}: {report.objects} objects ({human(report.bytes)}); {verb} "
              f"{len(report.deleted)} ({human(report.deleted_bytes)}); kept {report.kept_in_flight} in flight "
              "or recent")
    for key in report.deleted:
        say(args, f"  {key}")
    return 0


def cmd_pin(args) -> int:
    store = open_store(args)
    if not args.images:
        pins = inventory.pins(store)
        if not pins:
            say(args, "no pinned images")
        for p in pins:
            digests = inventory.resolve(store, p)
            say(args, f"{p}  {'-> ' + ', '.join(digests) if digests else '(not cached yet)'}")
        return 0
    for text in args.images:
        ref = _image(text)
        inventory.pin(store, ref)
        cached = bool(inventory.resolve(store, ref)) and any(
            store.get_manifest(d) for d in inventory.resolve(store, ref)
        )
        say(args, f"pinned {ref}" + ("" if cached else " (not cached yet: it will be kept once pulled)"))
    return 0


def cmd_unpin(args) -> int:
    store = open_store(args)
    status = 0
    for text in args.images:
        ref = _image(text)
        if inventory.unpin(store, ref):
            say(args, f"unpinned {ref}")
        else:
            say(args, f"{ref} was not pinned")
            status = 1
    return status


def _image(text: str):
    try:
        return inventory.parse_image(text)
    except ValueError as e:
        raise CLIError(str(e)) from None


# --- verify ------------------------------------------------------------------------------------------------------


def cmd_verify(args) -> int:
    store = open_store(args)
    inv = inventory.Inventory(store)
    total = sum(e.size for e in inv.blobs.values()) + sum(e.size for e in inv.manifests.values())
    bar = progress_for(args, "verifying", total)
    try:
        result = inventory.verify(
            store, quarantine=not args.no_quarantine, stats=Stats(store.counters), progress=bar.advance
        )
    finally:
        bar.close()
    if args.json:
        print(
            json.dumps(
                {
                    "checked_blobs": result.checked_blobs,
                    "checked_manifests": result.checked_manifests,
                    "checked_bytes": result.checked_bytes,
                    "bad": [{"kind": k, "digest": d, "reason": r} for k, d, r in result.bad],
                    "quarantined": result.quarantined,
                },
                indent=2,
            )
        )
    else:
        say(
            args,
            f"checked {result.checked_blobs} blobs and {result.checked_manifests} manifests "
            f"({human(result.checked_bytes)})"
            + (": all match their digests" if not result.bad else f": {len(result.bad)} MISMATCH(ES)"),
        )
        for kind, digest, reason in result.bad:
            say(args, f"  {kind} {digest}: {reason}")
        if result.bad and not args.no_quarantine:
            say(
                args,
                f"  moved out of the store into {inventory.quarantine_dir(store)} (the next pull fetches them again)",
            )
    return 1 if result.bad else 0


# --- client-config -----------------------------------------------------------------------------------------------


def cmd_client_config(args) -> int:
    try:
        cache = clientconfig.parse_cache(args.cache)
    except ValueError as e:
        raise CLIError(str(e)) from None
    cache.proxy_port, cache.mirror_port, cache.transparent_port = (
        args.proxy_port,
        args.mirror_port,
        args.transparent_port,
    )
    kind = args.kind
    if kind == "docker":
        version = None
        if args.docker_version:
            try:
                version = clientconfig.parse_docker_version(args.docker_version)
            except ValueError as e:
                raise CLIError(str(e)) from None
        elif not args.no_proxies:
            version = clientconfig.installed_docker_version()
            if version is not None:
                note(
                    args,
                    f"# dockerd {version[0]}.{version[1]} is installed here; for another host's, give --docker-version",
                )
        text, hint = clientconfig.docker(cache, proxies=not args.no_proxies, version=version)
    elif kind == "containerd":
        text, hint = clientconfig.containerd(cache)
    elif kind == "podman":
        text, hint = clientconfig.podman(cache, args.registry or None)
    elif kind == "systemd":
        text, hint = clientconfig.systemd(cache, args.service)
    elif kind == "dns":
        try:
            text, hint = clientconfig.dns(cache)
        except ValueError as e:
            raise CLIError(str(e)) from None
    else:
        try:
            text, hint = clientconfig.iptables(cache, args.user, args.iface, remove=args.remove)
        except ValueError as e:
            raise CLIError(str(e)) from None
    sys.stdout.write(text)
    if not args.quiet:
        sys.stderr.write(hint)
    return 0


# --- ca ------------------------------------------------------------------------------------------------------------


def cmd_ca(args) -> int:
    certs = os.path.abspath(getattr(args, "certs", None) or os.environ.get("REGCACHE_CERTS") or DEFAULT_CERTS)
    try:
        if args.ca_command == "create":
            created, cert = cacerts.create(certs, args.organization)
            say(
                args,
                ("created" if created else "already there:")
                + f" {cert} (key {os.path.join(certs, cacerts.KEY_FILE)}, mode 0600)",
            )
            subject = cacerts.info(certs).subject
            say(args, f"subject {subject}")
            if not created and args.organization:
                note(
                    args,
                    "note: the existing CA is kept (clients trust it); --organization names a new one only "
                    f"(move {certs} away first to make one)",
                )
            return 0
        if args.ca_command == "show":
            ca = cacerts.info(certs)
            if args.pem:
                sys.stdout.write(ca.pem)
                return 0
            say(args, f"certificate  {ca.cert_path}")
            say(args, f"subject      {ca.subject}")
            say(args, f"valid        {ca.not_before} .. {ca.not_after}")
            say(args, f"sha256       {ca.sha256}")
            problem = cacerts.key_mode_problem(certs)
            if problem:
                say(args, f"WARNING      {problem}")
            say(args)
            sys.stdout.write(ca.pem)
            return 0
        # install
        if args.target == "system":
            done = cacerts.install_system(certs, root=args.root, update=not args.no_update)
            for d in done:
                say(args, f"installed: {d}")
            note(
                args,
                "restart the container runtime (systemctl restart docker / containerd) so it reloads the trust store",
            )
        elif args.target == "docker":
            hosts = args.host or [*clientconfig.MIRRORED, "registry-1.docker.io", "index.docker.io"]
            for d in cacerts.install_docker(certs, hosts, root=args.root):
                say(args, f"installed: {d}")
        else:
            dest, line = cacerts.install_containerd(certs, root=args.root)
            say(args, f"installed: {dest}")
            say(args, line)
            note(
                args,
                'put that line into each [host."https://REGISTRY"] section of '
                '/etc/containerd/certs.d/REGISTRY/hosts.toml '
                "(HTTPS_PROXY mode), or trust the CA system-wide: regcache ca install system",
            )
        return 0
    except cacerts.CAError as e:
        raise CLIError(str(e)) from None
    except PermissionError as e:
        raise CLIError(f"{e.filename}: permission denied (run as root, or give --root DIR)") from None


# --- the parser 

DESCRIPTION = """\
Operate a regcache pull-through cache: see what it holds and how well it works, warm it,
move images between sites, keep it within its size, check it, and point clients at it.
Every command works on the cache directory (--dir); a proxy may run on it meanwhile."""

EPILOG = """\
examples:
  regcache stats                                   hit ratio, bytes saved, store fill
  regcache ls docker.io/library/alpine             tags -> digests, sizes, last access
  regcache warm alpine:3.19 quay.io/org/app:1 --platform linux/amd64 --platform linux/arm64
  regcache warm --from-misses other-site/misses.jsonl
  regcache export alpine:3.19 -o /media/usb/bundle && regcache --dir /srv/cache import /media/usb/bundle
  regcache pin registry.k8s.io/pause:3.9 && regcache gc --max-size 20GiB
  regcache client-config containerd --cache cache.example.net > /etc/containerd/certs.d/_default/hosts.toml
  regcache ca create && regcache ca install system
"""


# The shared options each command really uses (its --help shows those only): --dir where it
# opens the cache dir, --config where the proxy's size_limit matters, -q where it prints hints
# on stderr, --no-progress where it draws a progress bar.
SHARED_OPTIONS = {
    "stats": ("dir", "config"),
    "ls": ("dir",),
    "warm": ("dir", "config", "quiet", "progress"),
    "export": ("dir", "config", "quiet", "progress"),
    "import": ("dir", "config", "quiet", "progress"),
    "gc": ("dir", "config"),
    "tier-gc": ("config",),
    "pin": ("dir",),
    "unpin": ("dir",),
    "verify": ("dir", "quiet", "progress"),
    "client-config": ("quiet",),
    "ca": ("quiet",),
}


def size_argument(text: str) -> int:
    """argparse type for sizes: a bad one is a usage error (exit status 2), not a traceback."""
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    shared = {name: argparse.ArgumentParser(add_help=False) for name in ("dir", "config", "quiet", "progress")}
    shared["dir"].add_argument(
        "--dir",
        default=argparse.SUPPRESS,
        metavar="DIR",
        help=f"cache directory (default: $REGCACHE_DIR or ./{DEFAULT_DIR_NAME})",
    )
    shared["config"].add_argument(
        "--config",
        default=argparse.SUPPRESS,
        metavar="FILE",
        help="the proxy's regcache_config YAML (for its size_limit; warm: its upstream_proxy)",
    )
    shared["quiet"].add_argument(
        "-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars or hints on stderr"
    )
    shared["progress"].add_argument(
        "--no-progress", action="store_true", default=argparse.SUPPRESS, help="no progress bars"
    )
    common = shared["quiet"]  # the CA's actions

    p = argparse.ArgumentParser(
        prog="regcache",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=list(shared.values()),
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND", title="commands")

    def add(name, help_, description=None, **kw):
        parents = [shared[option] for option in SHARED_OPTIONS[name]]
        return sub.add_parser(
            name,
            help=help_,
            description=description or help_,
            parents=parents,
            formatter_class=argparse.RawDescriptionHelpFormatter,
            **kw,
        )

    s = add(
        "stats",
        "hits, misses, hit ratio, bytes saved, store size, per registry",
        "Counters persisted in the cache dir by every proxy (and warm/gc/verify) that used it: requests by registry\n"
        "and outcome, bytes sent to clients vs fetched from upstream (the difference is what the cache saved).",
    )
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.add_argument("--reset", action="store_true", help="set every counter back to zero")
    s.set_defaults(func=cmd_stats)

    s = add(
        "ls",
        "what is cached: registries, repositories, tags -> digests, sizes, last access",
        "No argument: one line per registry. REGISTRY: its repositories. REGISTRY/REPO (or -a): every tag with\n"
        "its digest, manifest type, size (manifests + blobs in the cache), last access and completeness.",
    )
    s.add_argument("what", nargs="?", metavar="REGISTRY[/REPO]", help="e.g. docker.io or quay.io/org/app")
    s.add_argument("-a", "--all", action="store_true", help="list every tag")
    s.add_argument("--json", action="store_true", help="every tag as JSON")
    s.set_defaults(func=cmd_ls)

    s = add(
        "warm",
        "pre-pull images into the cache (directly, or through a running cache's mirror)",
        "Fetch images so that later pulls are hits: the manifest (tag), the manifests of the chosen platforms and\n"
        "every config and layer. By default straight into --dir (upstream TLS is checked against --upstream-ca,\n"
        "$SSL_CERT_FILE or certifi); with --mirror HOST:PORT through a running cache's mirror listener instead.\n"
        "Docker Hub style token auth (401 -> Bearer realm -> anonymous token) is handled.",
    )
    s.add_argument("images", nargs="*", metavar="IMAGE", help="alpine:3.19, quay.io/org/app:1, ghcr.io/o/x@sha256:…")
    s.add_argument("-f", "--file", action="append", metavar="LIST", help="a file with one image per line (# comments)")
    s.add_argument(
        "--from-misses",
        action="append",
        metavar="FILE",
        help="every image named in a miss log (a cache dir's misses.jsonl)",
    )
    s.add_argument(
        "--platform",
        action="append",
        metavar="OS/ARCH[/VARIANT]",
        help="platform(s) to take from multi-arch images (repeatable; 'all'; default linux/amd64)",
    )
    s.add_argument(
        "--mirror", metavar="HOST:PORT", help="pull through a running regcache's mirror listener (e.g. cache:5000)"
    )
    s.add_argument("-j", "--jobs", type=int, default=4, help="parallel blob downloads (default 4)")
    s.add_argument(
        "--upstream-ca", metavar="FILE", help="CA bundle for upstream TLS (default $SSL_CERT_FILE, else certifi)"
    )
    s.add_argument("--insecure", action="store_true", help="do not verify upstream TLS")
    s.add_argument("--timeout", type=float, default=30.0, help="upstream timeout in seconds (default 30)")
    s.add_argument("--username", help="registry user for private images (password from $REGCACHE_PASSWORD or a prompt)")
    s.set_defaults(func=cmd_warm)

    s = add(
        "export",
        "write images from the cache as an OCI image layout (skopeo copy oci:BUNDLE:IMAGE …)",
        "Each image becomes an entry of BUNDLE/index.json named by its full reference "
        "(docker.io/library/alpine:3.19);\n"
        "manifests and blobs are copied byte for byte (digests kept) and checked on the way. An existing bundle is\n"
        "added to. Read it with: skopeo copy oci:BUNDLE:docker.io/library/alpine:3.19 docker://…",
    )
    s.add_argument("images", nargs="+", metavar="IMAGE")
    s.add_argument("-o", "--output", required=True, metavar="BUNDLE", help="layout directory (created)")
    s.set_defaults(func=cmd_export)

    s = add(
        "import",
        "verify and store the images of an OCI image layout (made by regcache export)",
        "The bundle is not trusted: every digest is checked before it names a file, every manifest and blob is\n"
        "hashed against its digest before it enters the store, a tag is dated no later than now (an online cache\n"
        "revalidates it once tag_ttl is over), and the bundle's word that a repository is public is ignored:\n"
        "only --public makes an offline cache serve the images to anonymous clients. Each imported image is\n"
        "recorded as held by its repository, so the proxy serves it from the cache.",
    )
    s.add_argument("bundle", metavar="BUNDLE")
    s.add_argument(
        "--name",
        metavar="REGISTRY/REPO",
        help="repository for entries whose ref.name is a bare tag (layouts from other tools)",
    )
    g = s.add_mutually_exclusive_group()
    g.add_argument(
        "--public",
        action="store_true",
        help="vouch that the imported repositories are public (anonymous pull); not for one the bundle "
        "calls private, never over what upstream answered; an online cache asks upstream again "
        "at the first pull",
    )
    g.add_argument(
        "--private", action="store_true", help="record them as private (served only to clients upstream accepts)"
    )
    s.set_defaults(func=cmd_import)

    s = add(
        "gc",
        "evict least recently used images until the store fits --max-size (manifest-aware, pins kept)",
        "The unit of eviction is an image: a top-level manifest and everything only it references. Images go in\n"
        "least-recently-pulled order until the store fits; a blob a retained manifest references and anything of\n"
        "a pinned image are never removed. The running proxy does the same by itself above 90% of its size_limit.",
    )
    s.add_argument(
        "--max-size", metavar="SIZE", type=size_argument, help="e.g. 20GiB, 500MB (default: the proxy's size_limit)"
    )
    s.add_argument("-n", "--dry-run", action="store_true", help="only say what would go")
    s.set_defaults(func=cmd_gc)

    s = add(
        "tier-gc",
        "remove what no tag of the cache tier reaches from its S3 bucket (--config with a tier: section)",
        "Manifest-aware gc of the tier's shared bucket: everything a tag in the tier reaches is kept, the rest\n"
        "removed; with --max-size the least recently read blobs go next until the bucket fits. Safe against fills\n"
        "in flight on any node: an object whose digest is leased, or that was uploaded or read within --grace,\n"
        "stays. Nodes' local layers are not touched (each node's own gc does that).",
    )
    s.add_argument("--max-size", metavar="SIZE", type=size_argument, help="size limit of the bucket, e.g. 2TiB")
    s.add_argument("--grace", metavar="SECONDS", type=float, default=3600.0,
                   help="keep objects uploaded or read this recently (default 3600)")
    s.add_argument("-n", "--dry-run", action="store_true", help="only say what would go")
    s.set_defaults(func=cmd_tier_gc)

    s = add("pin", "keep images through gc (no IMAGE: list the pinned ones)")
    s.add_argument("images", nargs="*", metavar="IMAGE")
    s.set_defaults(func=cmd_pin)
    s = add("unpin", "let gc evict images again")
    s.add_argument("images", nargs="+", metavar="IMAGE")
    s.set_defaults(func=cmd_unpin)

    s = add(
        "verify",
        "rehash every stored blob and manifest; quarantine mismatches",
        "A blob or manifest whose bytes do not hash to its digest is moved out of the store into DIR/quarantine/\n"
        "(with a .json note) so the next pull fetches it again. Exit status 1 when anything did not match.",
    )
    s.add_argument("--no-quarantine", action="store_true", help="only report")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=cmd_verify)

    s = add(
        "client-config",
        "print the configuration that points a runtime at this cache",
        "Prints the exact file on stdout (and where it goes on stderr):\n"
        "  docker      /etc/docker/daemon.json: registry-mirrors (Docker Hub) + proxies (every registry, "
        "dockerd >= 23)\n"
        "  containerd  /etc/containerd/certs.d/_default/hosts.toml: one mirror for every registry\n"
        "  podman      /etc/containers/registries.conf.d/50-regcache.conf: a path-prefix mirror per registry\n"
        "  systemd     a drop-in with HTTPS_PROXY and NO_PROXY (the cache host is never proxied: fast-path redirects)\n"
        "  iptables    transparent mode: REDIRECT of port 443, exempting regcache's own traffic by owner\n"
        "  dns         the DNS way in: /etc/hosts lines pointing registries at the cache (--cache IP)\n"
        "              and daemon.json",
    )
    s.add_argument("kind", choices=clientconfig.KINDS)
    s.add_argument(
        "--cache",
        metavar="HOST[:PORT]",
        help="how clients reach the cache (default: this host's name); a port replaces the listener's default",
    )
    s.add_argument(
        "--proxy-port", type=int, default=clientconfig.PROXY_PORT, help="HTTPS_PROXY listener (default 8080)"
    )
    s.add_argument("--mirror-port", type=int, default=clientconfig.MIRROR_PORT, help="mirror listener (default 5000)")
    s.add_argument(
        "--transparent-port",
        type=int,
        default=clientconfig.TRANSPARENT_PORT,
        help="transparent listener (default 8081)",
    )
    s.add_argument("--no-proxies", action="store_true", help='docker: mirrors only (dockerd < 23 rejects "proxies")')
    s.add_argument(
        "--docker-version",
        metavar="VERSION",
        help="docker: the node's dockerd version (20.10, 24.0.7, or `dockerd --version`'s output); default: "
        'this host\'s dockerd; "proxies" only for >= 23, none when unknown',
    )
    s.add_argument("--registry", action="append", metavar="REGISTRY", help="podman: only these registries (repeatable)")
    s.add_argument(
        "--service", default="docker", help="systemd: the unit to configure (default docker; e.g. containerd)"
    )
    s.add_argument(
        "--user", default="regcache", help="iptables: the user regcache runs as (exempted; default regcache)"
    )
    s.add_argument("--iface", metavar="IFACE", help="iptables: only redirect traffic arriving on this interface")
    s.add_argument("--remove", action="store_true", help="iptables: print the script that removes the rules again")
    s.set_defaults(func=cmd_client_config)

    s = add(
        "ca",
        "create, show or install the CA clients trust for intercepted registries",
        "The CA lives in mitmproxy's confdir format in --certs (default ./certs, what run.sh passes as confdir):\n"
        "mitmproxy-ca.pem (key + certificate, mode 0600, never printed) and mitmproxy-ca-cert.pem (what "
        "clients trust).",
    )
    certs = argparse.ArgumentParser(add_help=False)
    certs.add_argument(
        "--certs", default=argparse.SUPPRESS, metavar="DIR", help="CA directory (default $REGCACHE_CERTS or ./certs)"
    )
    s.add_argument(
        "--certs", default=argparse.SUPPRESS, metavar="DIR", help="CA directory (default $REGCACHE_CERTS or ./certs)"
    )
    ca_sub = s.add_subparsers(dest="ca_command", metavar="ACTION", required=True)
    create = ca_sub.add_parser(
        "create", help="create the CA with mitmproxy (kept if it exists)", parents=[common, certs]
    )
    create.add_argument(
        "--organization",
        metavar="NAME",
        help=f"the CA's organisation (O=) in clients' trust stores (default {cacerts.DEFAULT_ORGANIZATION}); "
        f'its name (CN=) is "{cacerts.CA_COMMON_NAME}"',
    )
    show = ca_sub.add_parser("show", help="print the certificate (never the key)", parents=[common, certs])
    show.add_argument("--pem", action="store_true", help="only the PEM certificate")
    inst = ca_sub.add_parser(
        "install", help="trust the CA: system store, dockerd certs.d, or containerd", parents=[common, certs]
    )
    inst.add_argument("target", choices=("system", "docker", "containerd"))
    inst.add_argument(
        "--host",
        action="append",
        metavar="HOST",
        help="docker: registry host(s) to trust it for (default: the built-in registries)",
    )
    inst.add_argument(
        "--root", default="/", metavar="DIR", help="install below this root instead of / (images, chroots)"
    )
    inst.add_argument("--no-update", action="store_true", help="system: do not run update-ca-certificates")
    s.set_defaults(func=cmd_ca)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # options given before or after the command mean the same
    for name, default in (("dir", None), ("config", None), ("quiet", False), ("no_progress", False)):
        if not hasattr(args, name):
            setattr(args, name, default)
    args.dir = args.dir or default_dir()
    args.config = args.config or os.environ.get("REGCACHE_CONFIG") or None
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args) or 0
    except (CLIError, ConfigError) as e:
        print(f"regcache {args.command}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
