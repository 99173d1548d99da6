"""The README's dashboard screenshot: a real gated campaign (GP agent, simulated lab inline).

Run from the repository root (needs /usr/bin/chromium and chromedriver):
    PYTHONPATH=. python docs/dashboard_screenshot.py /tmp/shot   # writes /tmp/shot/dashboard.png
A person is played by this script: it approves two waiting proposals at a time until 12 were
approved, then the page is loaded with the operator token while four proposals wait.
"""

import csv
import os
import sys
import threading
import time
from pathlib import Path

from loop.approval import decide, list_proposals
from loop.campaign import Campaign
from loop.config import parse_config
from loop.store import PROPOSED, CampaignStore
from tests.loop.test_approval import _real
from tests.loop.test_dashboard import TOKENS, _Server

work = Path(sys.argv[1])
work.mkdir(parents=True, exist_ok=True)
rows = list(
    csv.DictReader(
        (
            Path(os.environ.get("CLOUDLAB_DATA_DIR", "../shared/data"))
            / "cloud"
            / "cloud_cv_train_and_val.csv"
        ).open()
    )
)[:60]
pool = work / "cv_pool.csv"
with pool.open("w", newline="") as fh:
    w = csv.writer(fh)
    w.writerow(["id", "scope", "cv"])
    for i, r in enumerate(rows):
        w.writerow([f"cv-{i}", r["cloud"], r["cv"]])
data = _real(pool)
data["budget"] = {"experiments": 16}
data["adapter"]["failure"] = {"probability": 0.15}
out = work / "run"
t = threading.Thread(target=lambda: Campaign(parse_config(data), out).run(), daemon=True)
t.start()
time.sleep(2)
store = CampaignStore(out)
n = 0
while n < 12:
    w = [p.candidate_id for p in list_proposals(store, status=PROPOSED)]
    if w:
        decide(store, w[:2], approve=True, actor="ann", note=None)
        n += len(w[:2])
    time.sleep(0.3)
time.sleep(2)
with _Server(out) as server:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    o = webdriver.ChromeOptions()
    o.binary_location = "/usr/bin/chromium"
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,1500"):
        o.add_argument(a)
    d = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=o)
    d.get(f"{server.url}/#token={TOKENS.operator}")
    time.sleep(3)
    d.save_screenshot(str(work / "dashboard.png"))
    d.quit()
print(store.job_counts())
