"""scripts/isolated_rows.py: the probes' result table (one home for its header, error and check columns)."""

from helpers import load_script


def test_print_table_rows_errors_and_checks(capsys):
    rows = load_script("isolated_rows.py")
    results = [{"row": "broken", "error": "x" * 100},
               {"row": "fast", "ms": 1.5, "correct": False, "checks": [{"seq": 384, "err": 0.25}]},
               {"row": "plain", "ms": 2.0}]

    def lines(r):
        chk = rows.check_text(r, lambda c: f"S={c['seq']}: {c['err']:.2f}")
        yield r["row"], f"{r['ms']:.3f}", chk
        yield r["row"], "again", ""

    rows.print_table(results, [("row", 8, "<"), ("ms", 7, ">")], lines, "check (err)")
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "row           ms  check (err)"
    assert out[1] == "broken         -  error: " + "x" * 80          # the error, cut to 80 characters
    assert out[2] == "fast       1.500  FAILED (S=384: 0.25)"
    assert out[3] == "fast       again  "
    assert out[4] == "plain      2.000  "                              # not checked: an empty check column
    assert out[5] == "plain      again  " and len(out) == 6
