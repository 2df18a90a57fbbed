"""gpu_suite section: bitfit (not written yet)."""
TITLE = "bitfit: not measured yet"


def run(b, cfg: dict, dry: bool) -> list[dict]:
    return [{"impl": "none", "status": "skip", "note": "section not written yet"}]


def render(rows: list[dict]) -> list[str]:
    return [f"- {r['impl']}: {r['status']} ({r.get('note', '')})" for r in rows]
