"""The chat page's first-answer latency in a real browser: from the question sent (the recording already
added, i.e. uploaded and decoded by the server) to the first streamed token shown.

    python -m benchmarks.web_latency --model runs/demo/stage2/final --manifest DATA/qa_test.jsonl [--questions 5]

Starts `eardrum web` on the model, opens the page in headless Chromium (Debian: chromium, chromium-driver;
selenium), and for each of the first `--questions` lines of the manifest: a new conversation, the line's
audio uploaded, the question asked ("Answer the question in the recording." unless the line has one), the
page's own measure read back (`data-first-token-ms` on the turn: performance.now() from the click to the
first token rendered). Prints (and with --out writes) JSON: each latency, their median, the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .report_io import emit, machine

QUESTION = "Answer the question in the recording."
WAIT_S = 300


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def measure(model: Path, manifest: Path, questions: int, max_tokens: int = 32) -> dict:
    """Run the page against `model` on the first `questions` lines of `manifest`; see the module."""
    import httpx
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support.ui import WebDriverWait

    lines = [json.loads(x) for x in manifest.read_text().splitlines() if x.strip()][:questions]
    port = _free_port()
    log = Path(tempfile.mkdtemp()) / "web.log"
    with open(log, "wb") as out:
        server = subprocess.Popen([sys.executable, "-m", "eardrum.cli", "web", "--model", str(model), "--port",
                                   str(port)], stdout=out, stderr=subprocess.STDOUT, env=os.environ.copy())
    base = f"http://127.0.0.1:{port}"
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or shutil.which("google-chrome") or ""
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900"):
        options.add_argument(flag)
    driver = None
    try:
        deadline = time.time() + WAIT_S
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"eardrum web exited: {log.read_text()[-2000:]}")
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                raise RuntimeError("eardrum web did not start in time")
            time.sleep(0.5)
        driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
        wait = WebDriverWait(driver, WAIT_S, poll_frequency=0.05)
        driver.get(f"{base}/")
        wait.until(lambda d: d.find_element("tag name", "body").get_attribute("data-ready"))
        tokens = driver.find_element("id", "max-tokens")
        tokens.clear()
        tokens.send_keys(str(max_tokens))
        rows = []
        for line in lines:
            driver.find_element("id", "reset").click()
            for remove in driver.find_elements("css selector", "#recordings .remove"):
                remove.click()
            driver.find_element("id", "file").send_keys(str((manifest.parent / line["audio"]).resolve()))
            wait.until(lambda d: d.find_elements("css selector", "#recordings .recording"))
            box = driver.find_element("id", "question")
            box.send_keys(line.get("question") or QUESTION)
            driver.find_element("id", "ask").click()
            done = wait.until(lambda d: d.find_elements("css selector", "#conversation .turn .answer.done"))
            turn = driver.find_elements("css selector", "#conversation .turn")[-1]
            rows.append({"audio": line["audio"], "first_token_ms": float(turn.get_attribute("data-first-token-ms")),
                         "answer": done[-1].text, "expected": line.get("answer")})
        latencies = [r["first_token_ms"] for r in rows]
        return {"model": str(model), "questions": len(rows), "median_first_token_ms": statistics.median(latencies),
                "first_token_ms": latencies, "examples": rows}
    finally:
        if driver is not None:
            driver.quit()
        server.terminate()
        server.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--manifest", type=Path, required=True, help="JSONL with audio (and question) per line")
    parser.add_argument("--questions", type=int, default=5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    report = {"benchmark": "web_latency", "machine": machine(),
              **measure(args.model, args.manifest, args.questions)}
    emit(report, args.out)


if __name__ == "__main__":
    main()
