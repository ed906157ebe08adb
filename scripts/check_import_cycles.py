"""Fail when modules of ``pipeline`` or ``flows`` import each other in a cycle.

import-linter's contracts check the direction between packages; this checks every
module, function-level imports included (grimp's graph), so that a new engineer can
read any module knowing only what it imports. Run by ``make lint``.
"""

from __future__ import annotations

import sys

import grimp

PACKAGES = ("pipeline", "flows")


def cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    modules = sorted(m for m in graph.modules if m.split(".")[0] in PACKAGES)
    edges = {
        m: sorted(n for n in graph.find_modules_directly_imported_by(m) if n.split(".")[0] in PACKAGES) for m in modules
    }
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    counter = 0
    for root in modules:
        if root in index:
            continue
        work = [(root, iter(edges[root]))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(edges.get(child, []))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def main() -> int:
    graph = grimp.build_graph(*PACKAGES, include_external_packages=False)
    found = cycles(graph)
    for component in found:
        print(f"import cycle between {len(component)} modules: {', '.join(component)}", file=sys.stderr)
        for module in component:
            for other in component:
                if other != module and graph.direct_import_exists(importer=module, imported=other):
                    lines = graph.get_import_details(importer=module, imported=other)
                    where = ", ".join(f"l.{d['line_number']}" for d in lines)
                    print(f"  {module} imports {other} ({where})", file=sys.stderr)
    if not found:
        print(f"no import cycles among the {len(graph.modules)} modules of {' and '.join(PACKAGES)}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
