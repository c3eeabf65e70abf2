"""Agent graphs: construction, predecessors, topological order and validation."""

import dataclasses

import pytest

from kvcomm_jax.agents.graphs import (
    AgentGraph,
    AgentNode,
    chain,
    full_connected,
    make_graph,
    star,
)

WORKERS = ("a", "b", "c", "d")


def _preds(graph):
    return {n.agent_id: graph.predecessors(n.agent_id) for n in graph.nodes}


def _assert_topological(graph):
    order = graph.topological_order()
    assert sorted(order) == sorted(n.agent_id for n in graph.nodes)
    position = {agent: i for i, agent in enumerate(order)}
    for src, dst in graph.edges:
        assert position[src] < position[dst]


def test_full_connected_one_round():
    g = full_connected(WORKERS, "judge")
    assert _preds(g) == {0: (), 1: (0,), 2: (0, 1), 3: (0, 1, 2), 4: (0, 1, 2, 3)}
    assert [n.role for n in g.nodes] == ["a", "b", "c", "d", "judge"]
    assert [n.is_decision for n in g.nodes] == [False] * 4 + [True]
    assert g.decision_id == 4
    assert g.topological_order() == (0, 1, 2, 3, 4)


def test_chain_one_round():
    g = chain(WORKERS, "judge")
    assert _preds(g) == {0: (), 1: (0,), 2: (1,), 3: (2,), 4: (3,)}
    _assert_topological(g)


def test_star_one_round():
    g = star(WORKERS, "judge")
    assert _preds(g) == {0: (), 1: (), 2: (), 3: (), 4: (0, 1, 2, 3)}
    _assert_topological(g)


def test_full_connected_two_rounds():
    g = full_connected(("a", "b"), "judge", rounds=2)
    assert _preds(g) == {0: (), 1: (0,), 2: (0, 1), 3: (0, 1, 2), 4: (2, 3)}
    assert [(n.agent_id, n.role, n.round) for n in g.nodes] == [
        (0, "a", 0), (1, "b", 0), (2, "a", 1), (3, "b", 1), (4, "judge", 1)]
    _assert_topological(g)


def test_chain_two_rounds():
    g = chain(("a", "b", "c"), "judge", rounds=2)
    assert _preds(g) == {0: (), 1: (0,), 2: (1,), 3: (0, 1, 2), 4: (0, 1, 2, 3),
                         5: (0, 1, 2, 4), 6: (5,)}
    _assert_topological(g)


def test_star_two_rounds():
    g = star(("a", "b"), "judge", rounds=2)
    assert _preds(g) == {0: (), 1: (), 2: (0, 1), 3: (0, 1), 4: (2, 3)}
    assert g.topological_order() == (0, 1, 2, 3, 4)


def test_topological_order_follows_edges_not_ids():
    nodes = tuple(AgentNode(i, "w", False, 0) for i in range(3))
    g = AgentGraph(nodes, ((2, 0), (0, 1)))
    assert g.topological_order() == (2, 0, 1)
    assert g.predecessors(1) == (0,)


@pytest.mark.parametrize("edges, message", [
    (((0, 1), (1, 2), (2, 0)), "cycle"),
    (((0, 0),), "own response"),
    (((0, 7),), "unknown agent"),
    (((0, 1), (0, 1)), "duplicate edges"),
])
def test_invalid_edges_raise(edges, message):
    nodes = tuple(AgentNode(i, "w", False, 0) for i in range(3))
    with pytest.raises(ValueError, match=message):
        AgentGraph(nodes, edges)


def test_invalid_nodes_raise():
    with pytest.raises(ValueError, match="duplicate agent ids"):
        AgentGraph((AgentNode(0, "w", False, 0), AgentNode(0, "v", False, 0)), ())
    with pytest.raises(ValueError, match="at most one decision"):
        AgentGraph((AgentNode(0, "j", True, 0), AgentNode(1, "j", True, 0)), ())
    with pytest.raises(ValueError, match="at least one"):
        AgentGraph((), ())


def test_lookups():
    g = chain(("a",), "judge")
    assert g.node(1) == AgentNode(1, "judge", True, 0)
    with pytest.raises(KeyError):
        g.predecessors(9)
    with pytest.raises(ValueError, match="no decision"):
        AgentGraph((AgentNode(0, "w", False, 0),), ()).decision_id
    with pytest.raises(dataclasses.FrozenInstanceError):
        g.nodes[0].role = "x"


@pytest.mark.parametrize("kind", ["full_connected", "chain", "star"])
def test_make_graph_counts_the_decision_agent(kind):
    g = make_graph(kind, 2, ("a", "b"), "judge")
    assert [(n.role, n.is_decision) for n in g.nodes] == [("a", False), ("judge", True)]
    assert g.predecessors(1) == (0,)
    g = make_graph(kind, 7, ("a", "b", "c"), "judge", rounds=2)
    assert [n.role for n in g.nodes] == ["a", "b", "c", "a", "b", "c"] * 2 + ["judge"]
    assert g.decision_id == 12
    _assert_topological(g)


def test_make_graph_rejects_bad_arguments():
    for n in (1, 0, -3):
        with pytest.raises(ValueError, match=">= 2"):
            make_graph("chain", n, ("a",), "judge")
    with pytest.raises(ValueError, match="full_connected, chain, star"):
        make_graph("ring", 3, ("a",), "judge")
    with pytest.raises(ValueError, match="rounds"):
        make_graph("star", 3, ("a",), "judge", rounds=0)
    with pytest.raises(ValueError, match="empty"):
        make_graph("star", 3, (), "judge")
