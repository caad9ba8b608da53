"""Selection rules and budgets on hand-made score tables."""

from __future__ import annotations

import pytest

from blockem.select import (calibration_scores, screen_scores, select, split_signs, union_sets,
                            within_budget, with_repair_alphas)

FLAT = {"mode": "flat", "value": 0.10}
REL = {"mode": "relative", "value": 0.10}


def row(latent, mode, alpha, em, inc, sign=1):
    return {"latent": latent, "sign": sign, "mode": mode, "alpha": alpha, "em": em,
            "incoherence": inc, "refusal": 0.0, "n": 100}


BASE = [row(-1, "induce", 0.0, 0.02, 0.05, 0), row(-1, "repair", 0.0, 0.80, 0.05, 0)]
SHIFT = [{"latent": k, "sign": s, "delta": d, "candidate_rank": r, "density_base": 0.1,
          "density_mis": 0.2} for k, s, d, r in
         [(0, 1, 0.9, 0), (1, 1, 0.5, 1), (2, -1, -0.7, 0), (3, -1, -0.1, 1), (4, 1, 0.01, -1)]]


def test_budgets():
    assert within_budget(0.10, 0.05, FLAT) and not within_budget(0.11, 0.05, FLAT)
    assert within_budget(0.14, 0.05, REL) and not within_budget(0.16, 0.05, REL)


def test_screen_gains_count_only_inside_the_budget():
    rows = BASE + [row(0, "induce", 0.5, 0.30, 0.05), row(0, "repair", 0.5, 0.40, 0.08),
                   row(1, "induce", 0.5, 0.50, 0.30), row(1, "repair", 0.5, 0.10, 0.50),
                   row(2, "induce", 0.5, 0.10, 0.02, -1), row(2, "repair", 0.5, 0.70, 0.02, -1)]
    s = screen_scores(rows, FLAT)
    assert s[0]["induce_gain"] == pytest.approx(0.28) and s[0]["repair_gain"] == pytest.approx(0.40)
    assert s[1]["indpp"] == 0.0  # strong effects, but incoherent
    assert s[2]["indpp"] == pytest.approx(0.08 + 0.10) and s[2]["sign"] == -1


def calib_rows():
    return BASE + [
        # latent 0: valid; strongest in-budget repair alpha is 0.3
        row(0, "induce", 0.1, 0.05, 0.05), row(0, "induce", 0.3, 0.20, 0.09), row(0, "induce", 0.5, 0.4, 0.3),
        row(0, "repair", 0.1, 0.70, 0.05), row(0, "repair", 0.3, 0.40, 0.10), row(0, "repair", 0.5, 0.1, 0.4),
        # latent 2: repairs a lot but never induces -> invalid for validreduc
        row(2, "induce", 0.1, 0.02, 0.05, -1), row(2, "induce", 0.3, 0.01, 0.05, -1),
        row(2, "repair", 0.1, 0.30, 0.05, -1), row(2, "repair", 0.3, 0.20, 0.06, -1),
        # latent 1: valid, smaller repair
        row(1, "induce", 0.1, 0.06, 0.05), row(1, "induce", 0.3, 0.06, 0.05),
        row(1, "repair", 0.1, 0.75, 0.05), row(1, "repair", 0.3, 0.60, 0.05),
        # latent 3: every alpha over budget -> no alpha*
        row(3, "induce", 0.1, 0.9, 0.5, -1), row(3, "repair", 0.1, 0.0, 0.9, -1),
    ]


def test_calibration_alpha_star_is_the_strongest_alpha_inside_the_budget():
    c = calibration_scores(calib_rows(), FLAT)
    assert c[0]["alpha_ind"] == 0.3 and c[0]["alpha_rep"] == 0.3
    assert c[0]["score"] == pytest.approx(0.40) and c[0]["valid"]
    assert c[2]["alpha_rep"] == 0.3 and not c[2]["valid"]
    assert c[3]["alpha_ind"] is None and c[3]["alpha_rep"] is None and not c[3]["valid"]
    # relative budget: unsteered incoherence 0.05 + 0.40 admits alpha 0.5 (incoherence 0.4)
    rel = calibration_scores(calib_rows(), {"mode": "relative", "value": 0.40})
    assert rel[0]["alpha_rep"] == 0.5 and rel[0]["repair_gain"] == pytest.approx(0.70)
    assert calibration_scores(calib_rows(), {"mode": "relative", "value": 0.30})[0]["alpha_rep"] == 0.3


def test_validreduc_keeps_valid_latents_ranked_by_repair():
    c = calibration_scores(calib_rows(), FLAT)
    chosen = select("validreduc", 5, shift=SHIFT, screen={}, calib=c)
    assert [k["latent"] for k in chosen] == [0, 1]
    assert split_signs(chosen) == {"K_pos": [0, 1], "K_neg": []}


def test_indpp_topdelta_random():
    s = screen_scores(BASE + [row(0, "induce", 0.5, 0.12, 0.05), row(0, "repair", 0.5, 0.70, 0.05),
                              row(2, "induce", 0.5, 0.32, 0.05, -1), row(2, "repair", 0.5, 0.5, 0.05, -1),
                              row(1, "induce", 0.5, 0.0, 0.05), row(1, "repair", 0.5, 0.9, 0.05)], FLAT)
    assert [k["latent"] for k in select("indpp", 3, shift=SHIFT, screen=s, calib={})] == [2, 0]
    assert [k["latent"] for k in select("topdelta", 3, shift=SHIFT, screen={}, calib={})] == [0, 2, 1]
    r1 = select("random", 3, shift=SHIFT, screen={}, calib={}, seed=1)
    assert r1 == select("random", 3, shift=SHIFT, screen={}, calib={}, seed=1)
    assert len({k["latent"] for k in r1}) == 3
    assert {k["sign"] for k in r1} <= {1, -1}
    with pytest.raises(ValueError, match="unknown selection rule"):
        select("best", 3, shift=SHIFT, screen={}, calib={})


def test_union_and_repair_alpha_transfer():
    a = {"name": "a", "layer": 2, "sae": {"id": "x"}, "latents": [{"latent": 1, "sign": 1}, {"latent": 2, "sign": -1}]}
    b = {"name": "b", "layer": 2, "sae": {"id": "x"}, "latents": [{"latent": 2, "sign": -1}, {"latent": 5, "sign": 1}]}
    u = union_sets([a, b], "ab")
    assert [k["latent"] for k in u["latents"]] == [1, 2, 5] and u["K_neg"] == [2]
    with pytest.raises(ValueError):
        union_sets([a, {**b, "layer": 3}], "bad")
    ref = [{"calib_alpha_rep": 0.3}, {"calib_alpha_rep": None}]
    out = with_repair_alphas([{"latent": 7}, {"latent": 8}, {"latent": 9}], ref, fallback=0.5)
    assert [k["alpha_rep"] for k in out] == [0.3, 0.5, 0.5]


def partial_rows():
    """A sweep as the adaptive screen leaves it (blockem/adaptive.py): only the probed alphas."""
    return BASE + [
        # latent 0: bisection probed 0.5 (in), 0.8 (out), 0.6 (in) -> alpha* 0.6 on both modes
        row(0, "induce", 0.5, 0.30, 0.05), row(0, "induce", 0.8, 0.60, 0.40),
        row(0, "induce", 0.6, 0.35, 0.09),
        row(0, "repair", 0.6, 0.30, 0.10), row(0, "repair", 0.5, 0.45, 0.05),
        row(0, "repair", 0.8, 0.05, 0.50),
        # latent 1: 0.5 out, 0.3 in, 0.4 out -> alpha* 0.3; its gain is the 0.3 row's
        row(1, "induce", 0.5, 0.50, 0.30), row(1, "induce", 0.3, 0.10, 0.02),
        row(1, "induce", 0.4, 0.20, 0.20),
        row(1, "repair", 0.3, 0.60, 0.02), row(1, "repair", 0.5, 0.20, 0.60),
        row(1, "repair", 0.4, 0.40, 0.30),
        # latent 2: only repair rows (no induce measured): never valid, whatever its repair
        row(2, "repair", 0.5, 0.00, 0.01, -1),
        # latent 3: every probe out of budget
        row(3, "induce", 0.3, 0.50, 0.50), row(3, "induce", 0.2, 0.40, 0.30),
        row(3, "repair", 0.1, 0.10, 0.40),
    ]


def test_calibration_and_selection_on_a_partial_sweep():
    c = calibration_scores(partial_rows(), FLAT)
    assert (c[0]["alpha_ind"], c[0]["alpha_rep"]) == (0.6, 0.6)
    assert c[0]["induce_gain"] == pytest.approx(0.33) and c[0]["score"] == pytest.approx(0.50)
    assert (c[1]["alpha_ind"], c[1]["alpha_rep"]) == (0.3, 0.3)
    assert c[1]["induce_gain"] == pytest.approx(0.08) and c[1]["score"] == pytest.approx(0.20)
    assert c[2]["alpha_ind"] is None and c[2]["alpha_rep"] == 0.5 and not c[2]["valid"]
    assert c[3]["alpha_ind"] is None and c[3]["alpha_rep"] is None and not c[3]["valid"]
    # row order does not matter (rows are sorted by alpha before the last in-budget one wins)
    assert calibration_scores(list(reversed(partial_rows())), FLAT) == c
    chosen = select("validreduc", 5, shift=SHIFT, screen={}, calib=c)
    assert [k["latent"] for k in chosen] == [0, 1]
    assert [k["calib_alpha_rep"] for k in chosen] == [0.6, 0.3]
    assert [k["latent"] for k in select("validreduc", 1, shift=SHIFT, screen={}, calib=c)] == [0]


def test_a_steering_table_without_its_unsteered_row_is_an_error():
    rows = [r for r in partial_rows() if not (r["latent"] == -1 and r["mode"] == "repair")]
    with pytest.raises(ValueError, match=r"no unsteered row .* \['repair'\]"):
        calibration_scores(rows, FLAT)
    with pytest.raises(ValueError, match="no unsteered row"):
        screen_scores(rows, FLAT)
