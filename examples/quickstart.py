"""fleche quickstart: store values and call records, find them again by content.

Run: python3 examples/quickstart.py
"""

from fleche.call import Call, QueryCall
from fleche.digest import digest
from fleche.storage import CallMemory, ValueMemory


def simulate(temperature: float, steps: int = 100) -> dict:
    """A stand-in for an expensive computation."""
    return {"energy": temperature * steps, "trace": [temperature] * 3}


def main() -> None:
    values, calls = ValueMemory(), CallMemory()

    # Values live under their content digest; nested containers are stored part by part.
    result = simulate(1.5)
    key = values.save(result)
    assert key == digest(result)
    print(f"saved the result under {values.shrink(key)} ({len(values.storage)} entries)")
    print("loaded again:", values.load(values.shrink(key)))

    # A call record points at stored values by digest; its key depends on what was called.
    call = Call.from_call(simulate, 1.5).replace(result=result)
    for value in call.arguments.values():
        values.save(value)
    call_key = calls.save(call)
    print(f"call {calls.shrink(call_key)}: {call.name}{dict(call.arguments)}")

    # The same call, asked again, finds the record: no need to recompute.
    again = Call.from_call(simulate, 1.5)
    record = calls.load(again.to_lookup_key())
    print("found by lookup key; result:", values.load(record.result))

    # Templates find calls by any argument, given as a value or as its digest.
    matches = list(calls.query(QueryCall(name="simulate", arguments={"steps": 100})))
    print(f"{len(matches)} stored call(s) of simulate with steps=100")


if __name__ == "__main__":
    main()
