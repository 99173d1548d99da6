"""The live campaign dashboard: a small web app over the campaign store.

:mod:`loop.dashboard.state` reads one snapshot of a campaign from its store (safe
while the campaign runs: SQLite WAL readers); :mod:`loop.dashboard.server` serves
it with the page in ``static/`` (plain JavaScript shipped with the package, no CDN)
and takes approve/reject decisions from operators.
"""
