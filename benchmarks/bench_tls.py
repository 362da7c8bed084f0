#!/usr/bin/env python
"""What DICOM TLS costs, against plain TCP in the same run.

1. Ingest: DCMTK ``storescu`` sends LIDC-IDRI-0001 (133 CT instances, 70 MB; Armato et al.,
   TCIA, doi:10.7937/K9/TCIA.2015.LO9QL9SX) to one ``dicom-node listen`` that serves the plain
   port and the TLS port side by side (``+tls`` with a client certificate), alternating,
   ``--repeats`` times each; prints the median seconds and the ratio TLS / plain.
2. Association set-up: ``dicom_node.scu.echo`` (C-ECHO, one association each) to the same
   listener, plain and TLS (client certificate), ``--echoes`` times each; median milliseconds.
3. Dispatch: the node's SCU (``dicom_node.scu.store``) sends the same files to DCMTK
   ``storescp`` and to ``storescp +tls`` (peer certificate required), alternating; same figures.

Certificates are made for the run with ``openssl`` (RSA 2048, as tests/test_tls.py).
Usage: python benchmarks/bench_tls.py [--repeats 3] [--echoes 20]
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.peers import LIDC_SERIES, free_port, wait_port  # noqa: E402


def make_pki(folder: Path) -> None:
    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=bench CA", "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    for name in ("server", "client"):
        (folder / f"{name}.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n"
                                            "extendedKeyUsage=serverAuth,clientAuth\n")
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
            "-subj", f"/CN={name}")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext")


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def report(label: str, plain: list[float], tls: list[float]) -> None:
    p, t = statistics.median(plain), statistics.median(tls)
    print(f"{label}: plain {p:.2f} s, TLS {t:.2f} s (median of {len(plain)}), TLS/plain {t / p:.2f}")


def bench_echo(plain_port: int, tls_port: int, pki: Path, echoes: int) -> None:
    from dicom_node.config import TLSSection
    from dicom_node.scu import echo

    cfg = TLSSection(certificate=pki / "client.pem", private_key=pki / "client.key", ca_certificates=pki / "ca.pem")

    def ping(port: int, tls) -> None:  # noqa: ANN001
        outcome = echo("DICOM_NODE", "127.0.0.1", port, calling_ae="STORESCU", tls=tls)
        assert outcome.ok, outcome.message

    plain, tls = [], []
    for _ in range(echoes):
        plain.append(timed(lambda: ping(plain_port, None)))
        tls.append(timed(lambda: ping(tls_port, cfg)))
    p, t = statistics.median(plain) * 1000, statistics.median(tls) * 1000
    print(f"C-ECHO association: plain {p:.0f} ms, TLS {t:.0f} ms (median of {echoes}), TLS - plain {t - p:.0f} ms")


def bench_ingest(work: Path, pki: Path, repeats: int, echoes: int) -> None:
    plain_port, tls_port = free_port(), free_port()
    cfg = work / "config.toml"
    cfg.write_text(textwrap.dedent(f"""
        [node]
        host = "127.0.0.1"
        port = {plain_port}
        data_dir = "{work / 'var'}"
        [tls]
        enabled = true
        port = {tls_port}
        certificate = "{pki / 'server.pem'}"
        private_key = "{pki / 'server.key'}"
        ca_certificates = "{pki / 'ca.pem'}"
        [[sources]]
        ae_title = "STORESCU"
        """))
    log = open(work / "listen.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "dicom_node.cli", "listen", "--config", str(cfg)], cwd=REPO,
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_port(plain_port, 60, proc)
        wait_port(tls_port, 60, proc)
        tls_args = ["+tls", str(pki / "client.key"), str(pki / "client.pem"), "+cf", str(pki / "ca.pem")]

        def send(port: int, extra: list[str]) -> None:
            subprocess.run(["storescu", "-aet", "STORESCU", "-aec", "DICOM_NODE", *extra, "127.0.0.1", str(port),
                            "+sd", str(LIDC_SERIES)], check=True, capture_output=True, timeout=600)

        send(plain_port, [])  # warm-up (first write of each instance; later sends are identical duplicates)
        plain, tls = [], []
        for _ in range(repeats):
            plain.append(timed(lambda: send(plain_port, [])))
            tls.append(timed(lambda: send(tls_port, tls_args)))
        report("ingest, storescu -> node, 133 instances", plain, tls)
        bench_echo(plain_port, tls_port, pki, echoes)
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def bench_dispatch(work: Path, pki: Path, repeats: int, echoes: int) -> None:
    from dicom_node.config import TLSSection
    from dicom_node.scu import store

    files = sorted(p for p in LIDC_SERIES.iterdir() if p.is_file())
    plain_port, tls_port = free_port(), free_port()
    (work / "plain").mkdir()
    (work / "tls").mkdir()
    peers = [subprocess.Popen(["storescp", "--aetitle", "STORESCP", "-od", str(work / "plain"), "--accept-all",
                               str(plain_port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
             subprocess.Popen(["storescp", "--aetitle", "STORESCP", "-od", str(work / "tls"), "--accept-all",
                               "+tls", str(pki / "server.key"), str(pki / "server.pem"), "+cf", str(pki / "ca.pem"),
                               "-rc", str(tls_port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        wait_port(plain_port)
        wait_port(tls_port)
        cfg = TLSSection(certificate=pki / "client.pem", private_key=pki / "client.key",
                         ca_certificates=pki / "ca.pem")

        def send(port: int, tls) -> None:  # noqa: ANN001
            outcome = store(files, "STORESCP", "127.0.0.1", port, timeout=120, tls=tls)
            assert outcome.ok, outcome.message

        plain, tls = [], []
        for _ in range(repeats):
            plain.append(timed(lambda: send(plain_port, None)))
            tls.append(timed(lambda: send(tls_port, cfg)))
        report("dispatch, node SCU -> storescp, 133 instances", plain, tls)
    finally:
        for p in peers:
            p.terminate()
            p.wait(10)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--echoes", type=int, default=20)
    args = ap.parse_args()
    if not LIDC_SERIES.is_dir():
        print(f"LIDC-IDRI-0001 not found at {LIDC_SERIES}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        pki = work / "pki"
        pki.mkdir()
        make_pki(pki)
        for name, bench in (("ingest", bench_ingest), ("dispatch", bench_dispatch)):
            (work / name).mkdir()
            bench(work / name, pki, args.repeats, args.echoes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
