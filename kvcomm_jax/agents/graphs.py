"""Agent graphs: who receives whose response.

A pipeline is a DAG of agents. Workers answer the task (each sees the responses of its
predecessors); one decision agent receives the last workers and gives the final answer.
Agent ids are unique across rounds: round r's workers are ``r * W .. r * W + W - 1`` for W
workers per round, and the decision agent comes last.

Kinds (``make_graph``):
* ``full_connected``: worker i receives every worker j < i of its round; the decision agent
  receives all workers of the last round (the paper's "FullConnected").
* ``chain``: worker i receives worker i - 1 of its round; the decision agent receives the
  last worker.
* ``star``: workers receive only the question; the decision agent receives all workers of the
  last round.
For every kind with ``rounds > 1``, each worker of round r also receives every worker of
round r - 1.
"""

from __future__ import annotations

import dataclasses
import heapq
from collections.abc import Callable, Sequence


@dataclasses.dataclass(frozen=True)
class AgentNode:
    """One agent: its id, role, whether it is the decision agent, and its round (0-based)."""

    agent_id: int
    role: str
    is_decision: bool
    round: int


@dataclasses.dataclass(frozen=True)
class AgentGraph:
    """A validated DAG of agents; `edges` are (sender, receiver) pairs.

    Raises ValueError on duplicate ids, unknown or self edges, duplicate edges, more than one
    decision agent, or a cycle.
    """

    nodes: tuple[AgentNode, ...]
    edges: tuple[tuple[int, int], ...]

    def __post_init__(self):
        ids = [n.agent_id for n in self.nodes]
        if not ids:
            raise ValueError("an agent graph needs at least one agent")
        if len(set(ids)) != len(ids):
            raise ValueError(f"duplicate agent ids: {sorted(ids)}")
        if sum(n.is_decision for n in self.nodes) > 1:
            raise ValueError("an agent graph has at most one decision agent")
        known = set(ids)
        for src, dst in self.edges:
            if src not in known or dst not in known:
                raise ValueError(f"edge ({src}, {dst}) names an unknown agent")
            if src == dst:
                raise ValueError(f"agent {src} cannot receive its own response")
        if len(set(self.edges)) != len(self.edges):
            raise ValueError("duplicate edges")
        self.topological_order()  # raises on a cycle

    def node(self, agent_id: int) -> AgentNode:
        """The node with this id (KeyError if none)."""
        for n in self.nodes:
            if n.agent_id == agent_id:
                return n
        raise KeyError(f"no agent {agent_id}")

    @property
    def decision_id(self) -> int:
        """Id of the decision agent (ValueError if the graph has none)."""
        for n in self.nodes:
            if n.is_decision:
                return n.agent_id
        raise ValueError("graph has no decision agent")

    def predecessors(self, agent_id: int) -> tuple[int, ...]:
        """Agents whose responses `agent_id` receives, in ascending id order."""
        self.node(agent_id)
        return tuple(sorted(src for src, dst in self.edges if dst == agent_id))

    def topological_order(self) -> tuple[int, ...]:
        """Agent ids such that every agent follows its predecessors; ties go to the lower id."""
        indegree = {n.agent_id: 0 for n in self.nodes}
        successors: dict[int, list[int]] = {i: [] for i in indegree}
        for src, dst in self.edges:
            indegree[dst] += 1
            successors[src].append(dst)
        ready = [i for i, d in indegree.items() if d == 0]
        heapq.heapify(ready)
        order = []
        while ready:
            i = heapq.heappop(ready)
            order.append(i)
            for j in successors[i]:
                indegree[j] -= 1
                if indegree[j] == 0:
                    heapq.heappush(ready, j)
        if len(order) != len(indegree):
            cyclic = sorted(i for i, d in indegree.items() if d > 0)
            raise ValueError(f"agent graph has a cycle through agents {cyclic}")
        return tuple(order)


# (worker index i, worker count W) -> indices j of the same round that i receives.
_WithinRound = Callable[[int, int], Sequence[int]]


def _build(worker_roles: Sequence[str], decision_role: str, rounds: int,
           within_round: _WithinRound, decision_receives_last_only: bool) -> AgentGraph:
    roles = tuple(worker_roles)
    if not roles:
        raise ValueError("at least one worker is needed")
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    w = len(roles)
    nodes = [AgentNode(r * w + i, roles[i], False, r) for r in range(rounds) for i in range(w)]
    edges = []
    for r in range(rounds):
        for i in range(w):
            me = r * w + i
            edges += [(r * w + j, me) for j in within_round(i, w)]
            if r > 0:
                edges += [((r - 1) * w + j, me) for j in range(w)]
    decision = rounds * w
    nodes.append(AgentNode(decision, decision_role, True, rounds - 1))
    last_round = range((rounds - 1) * w, rounds * w)
    senders = [last_round[-1]] if decision_receives_last_only else list(last_round)
    edges += [(s, decision) for s in senders]
    return AgentGraph(tuple(nodes), tuple(edges))


def full_connected(worker_roles: Sequence[str], decision_role: str, rounds: int = 1) -> AgentGraph:
    """Worker i receives all workers j < i of its round; the decision agent receives all."""
    return _build(worker_roles, decision_role, rounds, lambda i, w: range(i), False)


def chain(worker_roles: Sequence[str], decision_role: str, rounds: int = 1) -> AgentGraph:
    """Worker i receives worker i - 1; the decision agent receives the last worker."""
    return _build(worker_roles, decision_role, rounds, lambda i, w: range(max(i - 1, 0), i), True)


def star(worker_roles: Sequence[str], decision_role: str, rounds: int = 1) -> AgentGraph:
    """Workers see only the question; the decision agent receives all workers."""
    return _build(worker_roles, decision_role, rounds, lambda i, w: (), False)


GRAPH_KINDS: dict[str, Callable[..., AgentGraph]] = {
    "full_connected": full_connected,
    "chain": chain,
    "star": star,
}


def make_graph(kind: str, n_agents: int, worker_roles: Sequence[str], decision_role: str,
               rounds: int = 1) -> AgentGraph:
    """Builds a graph of `n_agents` agents per the command line's ``--agents N``.

    `n_agents` counts the decision agent, so there are ``n_agents - 1`` workers per round,
    whose roles cycle through `worker_roles`.
    """
    if kind not in GRAPH_KINDS:
        raise ValueError(f"unknown graph kind {kind!r}; known kinds: {', '.join(GRAPH_KINDS)}")
    if n_agents < 2:
        raise ValueError(f"--agents counts the decision agent and must be >= 2, got {n_agents}")
    if not worker_roles:
        raise ValueError("worker_roles is empty")
    roles = [worker_roles[i % len(worker_roles)] for i in range(n_agents - 1)]
    return GRAPH_KINDS[kind](roles, decision_role, rounds)
