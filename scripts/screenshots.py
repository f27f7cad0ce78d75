"""What a user sees: screenshot the Dagster asset page of `evaluation_report` and an episode's MLflow trace.

    .venv/bin/python scripts/screenshots.py                      # runs the `tiny` preset into a new home first
    .venv/bin/python scripts/screenshots.py --home .dpo_home     # a home with a finished run
    bash scripts/screenshots.sh [--home DIR] [--out DIR]

Steps: (1) without --home, materialize the whole DAG with a preset (default `tiny`, ~2-10 min on CPU)
into a fresh temporary home, the way scripts/run_pipeline.sh does (without its setup step); (2) find
the newest MLflow `evaluation` run; if no traces are linked to it yet (assets that predate trace
logging), log a sample of its `report/episodes.jsonl` artifact as traces with
`dpo_driver.episode_traces.log_episode_traces`; (3) start `dagster-webserver` and `mlflow server` on
free local ports against that home, wait until both answer; (4) with headless Chromium (selenium,
/usr/bin/chromium + chromedriver) save PNGs to --out (default benchmarks/results/screenshots/):

    dagster_evaluation_report.png   the asset page (latest materialization and its metadata)
    dagster_report_markdown.png     the `report` markdown metadata opened (the plot, when embedded)
    mlflow_run_traces.png           the evaluation run's Traces tab (one row per sampled episode)
    mlflow_trace.png                one episode trace: the step spans, one step's prompt and output

(5) stop both servers (their process groups). Exit code 0 when every screenshot was written.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import ExitStack, contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
CHROMIUM = os.environ.get("MINIWOB_CHROME_BINARY") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = os.environ.get("MINIWOB_CHROMEDRIVER") or shutil.which("chromedriver") or "/usr/bin/chromedriver"
WINDOW = (1600, 1100)
DAGSTER_WINDOW = (1600, 1500)  # the asset page's metadata table is long


def log(msg: str) -> None:
    print(f"[screenshots] {msg}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def home_env(home: Path, dagster_home: Path) -> dict:
    return {**os.environ, "DPO_HOME": str(home), "DAGSTER_HOME": str(dagster_home),
            "MINIWOB_CHROME_BINARY": CHROMIUM, "MINIWOB_CHROMEDRIVER": CHROMEDRIVER, "PYTHONUNBUFFERED": "1",
            "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}


def run_preset(home: Path, dagster_home: Path, preset: str) -> None:
    """Materialize the whole DAG with `preset` into `home`, as scripts/run_pipeline.sh does."""
    env = home_env(home, dagster_home)
    subprocess.run([str(VENV_BIN / "python"), "-m", "resources.home", "init"], cwd=ROOT, env=env, check=True)
    config = subprocess.run([str(VENV_BIN / "python"), "-m", "dpo_assets.presets", preset], cwd=ROOT, env=env,
                            check=True, capture_output=True, text=True).stdout
    log(f"materializing the DAG with the {preset!r} preset into {home} (minutes)")
    t0 = time.time()
    subprocess.run([str(VENV_BIN / "dagster"), "asset", "materialize", "-m", "dpo_assets.definitions", "--select", "*",
                    "--config-json", config], cwd=ROOT, env=env, check=True)
    log(f"pipeline done in {time.time() - t0:.0f} s")


def evaluation_run_with_traces(home: Path, experiment: str, max_traces: int):
    """The newest `evaluation` run and one of its trace ids; logs traces from its episodes if it has none."""
    from dpo_driver.episode_traces import log_episode_traces, run_trace_count
    from dpo_driver.tracking import Tracker

    tracker = Tracker.local(home, experiment=experiment)
    runs = tracker.find_runs("evaluation")
    if not runs:
        raise SystemExit(f"no MLflow run tagged stage=evaluation in experiment {experiment!r} of {tracker.tracking_uri}; "
                         "materialize evaluation_report first (or leave out --home to run the tiny preset)")
    run = runs[0]
    if run_trace_count(tracker, run.info.run_id) == 0:
        with tempfile.TemporaryDirectory() as tmp:
            path = tracker.client.download_artifacts(run.info.run_id, "report/episodes.jsonl", tmp)
            episodes = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
        n = log_episode_traces(tracker, run.info.run_id, episodes, max_traces=max_traces, stage="evaluation")
        log(f"evaluation run {run.info.run_id} had no traces: logged {n} of its {len(episodes)} episodes")
    traces = tracker.client.search_traces(locations=[run.info.experiment_id], run_id=run.info.run_id,
                                          order_by=["timestamp_ms ASC"], max_results=100, include_spans=False)
    def steps(t) -> int:
        try:
            return int(json.loads(t.info.response_preview or "{}").get("num_steps", 0))
        except (ValueError, AttributeError):
            return 0

    # Show the candidate's episode with the most steps, a failure if one has as many.
    pick = max(traces, key=lambda t: (t.info.tags.get("dpo.policy") == "dpo", steps(t), t.info.tags.get("dpo.success") == "false"))
    return tracker, run, pick.info.trace_id


@contextmanager
def server(name: str, cmd: list[str], env: dict, url: str, log_dir: Path, timeout: float = 180):
    """Start `cmd` in its own process group, wait until `url` answers 200, stop the group on exit."""
    out = open(log_dir / f"{name}.log", "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}; see {log_dir / f'{name}.log'}")
            try:
                with urllib.request.urlopen(url, timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                raise RuntimeError(f"{name} did not answer {url} within {timeout:.0f} s; see {log_dir / f'{name}.log'}")
            time.sleep(1)
        log(f"{name} up: {url}")
        yield proc
    finally:
        for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
            if proc.poll() is not None:
                break
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(wait)
            except subprocess.TimeoutExpired:
                pass
        out.close()


def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={WINDOW[0]},{WINDOW[1]}", "--hide-scrollbars", "--force-device-scale-factor=1"):
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)


def wait_text(driver, text: str, timeout: float = 60, quiet: bool = False) -> bool:
    """Wait until `text` is on the page; False (not an error) if it never shows."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        WebDriverWait(driver, timeout).until(lambda d: text in d.find_element(By.TAG_NAME, "body").text)
        return True
    except TimeoutException:
        if not quiet:
            log(f"warning: {text!r} did not appear on {driver.current_url} within {timeout:.0f} s")
        return False


def click_text(driver, text: str, timeout: float = 20, quiet: bool = False) -> bool:
    """Click the first visible element whose own text is `text`; False if none shows up."""
    from selenium.common.exceptions import TimeoutException, WebDriverException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    xpath = f"//*[normalize-space(text())={json.dumps(text)}]"
    try:
        el = WebDriverWait(driver, timeout).until(
            lambda d: next((e for e in d.find_elements(By.XPATH, xpath) if e.is_displayed()), False))
        driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", el)
        el.click()
        return True
    except (TimeoutException, WebDriverException) as e:
        if not quiet:
            log(f"warning: could not click {text!r} on {driver.current_url}: {type(e).__name__}")
        return False


def shoot(driver, path: Path, settle: float = 3.0) -> Path:
    time.sleep(settle)  # let lazy panels and charts finish rendering
    driver.save_screenshot(str(path))
    log(f"wrote {path} ({path.stat().st_size // 1024} KiB)")
    return path


def screenshot_dagster(driver, base: str, out: Path) -> list[Path]:
    shots = []
    driver.get(f"{base}/assets/evaluation_report")
    wait_text(driver, "evaluation_report")
    if wait_text(driver, "Join the Dagster community", timeout=10, quiet=True):  # first-visit newsletter dialog
        click_text(driver, "Skip", timeout=5)
    wait_text(driver, "mlflow_run_id", timeout=60)  # the latest materialization's metadata has rendered
    shots.append(shoot(driver, out / "dagster_evaluation_report.png"))
    # Short markdown metadata renders inline in the table; long markdown (an embedded plot) behind
    # "[Show Markdown]", which opens it in a dialog where the image shows.
    if click_text(driver, "[Show Markdown]", timeout=5, quiet=True):
        shots.append(shoot(driver, out / "dagster_report_markdown.png"))
    else:
        from selenium.webdriver.common.by import By

        cells = [e for e in driver.find_elements(By.XPATH, "//td[normalize-space(.)='report']") if e.is_displayed()]
        if cells:
            driver.execute_script("arguments[0].scrollIntoView({block: 'start'});", cells[0])
            shots.append(shoot(driver, out / "dagster_report_markdown.png", settle=1.0))
    return shots


def screenshot_mlflow(driver, base: str, experiment_id: str, run_id: str, trace_id: str, out: Path) -> list[Path]:
    shots = []
    driver.get(f"{base}/")
    # The assistant side panel opens itself on a first visit and would cover a third of the page.
    driver.execute_script("localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');"
                          "localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');")
    driver.get(f"{base}/#/experiments/{experiment_id}/runs/{run_id}/traces")
    wait_text(driver, "tr-", timeout=60)  # trace ids in the list
    shots.append(shoot(driver, out / "mlflow_run_traces.png"))
    driver.get(f"{base}/#/experiments/{experiment_id}/traces?selectedEvaluationId={trace_id}")
    if wait_text(driver, "step 0", timeout=60):
        click_text(driver, "step 0", timeout=10)  # show a step span's prompt and output
    shots.append(shoot(driver, out / "mlflow_trace.png"))
    return shots


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--home", type=Path, help="DPO_HOME of a finished run (default: run --preset into a new temp home)")
    ap.add_argument("--dagster-home", type=Path, help="default: $DAGSTER_HOME if --home is given and it is set, else HOME/dagster")
    ap.add_argument("--preset", default="tiny", help="preset to run when --home is not given (default: tiny)")
    ap.add_argument("--experiment", default="dpo-driver", help="MLflow experiment of the pipeline (default: dpo-driver)")
    ap.add_argument("--max-traces", type=int, default=50, help="episodes to log as traces if the run has none")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "screenshots")
    ap.add_argument("--keep-home", action="store_true", help="keep the temp home made for --preset")
    args = ap.parse_args(argv)

    with ExitStack() as stack:
        if args.home is None:
            tmp = Path(tempfile.mkdtemp(prefix="dpo-screenshots-"))
            if not args.keep_home:
                stack.callback(shutil.rmtree, tmp, True)
            home, dagster_home = tmp, tmp / "dagster"
            run_preset(home, dagster_home, args.preset)
        else:
            home = args.home.resolve()
            dagster_home = (args.dagster_home or Path(os.environ.get("DAGSTER_HOME") or home / "dagster")).resolve()
        if not (home / "mlflow.db").is_file():
            raise SystemExit(f"{home / 'mlflow.db'} does not exist: not a DPO_HOME with a finished run")
        tracker, run, trace_id = evaluation_run_with_traces(home, args.experiment, args.max_traces)
        out = args.out.resolve()
        out.mkdir(parents=True, exist_ok=True)
        logs = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="dpo-screenshots-logs-")))

        env = home_env(home, dagster_home)
        dport, mport = free_port(), free_port()
        dagster_url, mlflow_url = f"http://127.0.0.1:{dport}", f"http://127.0.0.1:{mport}"
        try:
            stack.enter_context(server("dagster-webserver", [str(VENV_BIN / "dagster-webserver"), "-w", "workspace.yaml",
                                                             "-h", "127.0.0.1", "-p", str(dport)],
                                       env, f"{dagster_url}/server_info", logs))
            stack.enter_context(server("mlflow", [str(VENV_BIN / "mlflow"), "server", "--backend-store-uri", tracker.tracking_uri,
                                                  "--default-artifact-root", (home / "mlartifacts").as_uri(),
                                                  "--host", "127.0.0.1", "--port", str(mport), "--workers", "1"],
                                       env, f"{mlflow_url}/health", logs))
            driver = browser()
            stack.callback(driver.quit)
            driver.set_window_size(*DAGSTER_WINDOW)
            shots = screenshot_dagster(driver, dagster_url, out)
            driver.set_window_size(*WINDOW)
            shots += screenshot_mlflow(driver, mlflow_url, run.info.experiment_id, run.info.run_id, trace_id, out)
        except Exception:
            for f in sorted(logs.glob("*.log")):
                log(f"--- tail of {f.name}:\n" + "".join(f.read_text(errors="replace").splitlines(True)[-30:]))
            raise
    log(f"{len(shots)} screenshots in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
