"""tformer.pipeline.schedule_table: the ticks run_blocks' scan runs (it calls the same schedule_unit), checked
against the schedule's invariants: every (microbatch, layer group) once, on the group's stage, in layer
order, and the idle share equal to bubble_fraction."""

import pytest

from tformer import pipeline


@pytest.mark.parametrize("stages, microbatches, virtual", [(4, 8, 1), (4, 8, 2), (2, 2, 1), (2, 4, 3), (3, 3, 2)])
def test_schedule_table_runs_every_unit_once_in_layer_order(stages, microbatches, virtual):
    table = pipeline.schedule_table(stages, microbatches, virtual)
    assert len(table) == virtual * microbatches + stages - 1
    when = {}
    for t, row in enumerate(table):
        for s, cell in enumerate(row):
            if cell is not None:
                mb, group = cell
                assert group % stages == s, (t, s, cell)  # group r S + s lives on stage s
                assert (mb, group) not in when, f"{(mb, group)} runs twice"
                when[mb, group] = t
    groups = stages * virtual
    assert sorted(when) == [(mb, g) for mb in range(microbatches) for g in range(groups)]
    for mb in range(microbatches):
        ticks = [when[mb, g] for g in range(groups)]
        # Within a repeat, group g + 1 runs the tick after group g (the ppermute's one hop); the next repeat
        # waits in stage 0's buffer until its unit comes round, M - S + 1 >= 1 ticks after the last stage.
        gaps = [b - a for a, b in zip(ticks, ticks[1:])]
        assert gaps == [1 if (g + 1) % stages else microbatches - stages + 1 for g in range(groups - 1)], (mb, ticks)
    idle = sum(c is None for row in table for c in row) / (len(table) * stages)
    assert idle == pytest.approx(pipeline.bubble_fraction(stages, microbatches, virtual))


def test_gpipe_table_is_the_diagonal():
    assert pipeline.schedule_table(2, 3) == [[(0, 0), None], [(1, 0), (0, 1)], [(2, 0), (1, 1)], [None, (2, 1)]]
