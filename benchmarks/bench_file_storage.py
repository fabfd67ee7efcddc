"""Latency of the pickle file storages: hits, misses, contains, saves, lock round trips.

Run: ``PYTHONPATH=src python3 benchmarks/bench_file_storage.py`` (prints microseconds per call).
"""

from __future__ import annotations

import tempfile
import timeit

from fleche.digest import digest
from fleche.storage import CallPickleFile, ValuePickleFile


def per_call_us(fn, number: int = 5000) -> float:
    fn()
    return min(timeit.repeat(fn, number=number, repeat=3)) / number * 1e6


def main() -> None:
    with tempfile.TemporaryDirectory() as root:
        for name, values in [
            ("plain", ValuePickleFile(f"{root}/plain")),
            ("signed", ValuePickleFile(f"{root}/signed", secret_key="bench")),
            ("durable", ValuePickleFile(f"{root}/durable", durable=True)),
        ]:
            scalar = values.save(12345)
            blob = values.save(b"x" * 100_000)
            missing = digest("missing")
            print(f"{name:8} load scalar      {per_call_us(lambda: values.load(scalar)):8.1f} us")
            print(f"{name:8} get scalar (raw) {per_call_us(lambda: values.get(scalar)):8.1f} us")
            print(f"{name:8} load 100 kB      {per_call_us(lambda: values.load(blob)):8.1f} us")
            print(f"{name:8} contains         {per_call_us(lambda: values.contains(scalar)):8.1f} us")
            print(f"{name:8} contains miss    {per_call_us(lambda: values.contains(missing)):8.1f} us")
            n = 200 if name == "durable" else 2000
            print(f"{name:8} save scalar      {per_call_us(lambda: values.save(12345), n):8.1f} us")

            def locked() -> None:
                with values.locked(scalar):
                    pass

            print(f"{name:8} locked() empty   {per_call_us(locked):8.1f} us")
        calls = CallPickleFile(f"{root}/calls")
        from fleche.call import Call

        key = calls.save(Call.from_call(main).replace(result=1, metadata={"m": {"a": 1}}))
        print(f"{'calls':8} load record      {per_call_us(lambda: calls.load(key)):8.1f} us")


if __name__ == "__main__":
    main()
