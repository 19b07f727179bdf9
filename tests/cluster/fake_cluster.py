"""A 2-node Ray cluster on one machine, run as its own process (session) so that the test
fixture can kill everything it started with one killpg.

Nodes listen on 127.0.0.2 (head) and 127.0.0.3: Ray rewrites 127.0.0.1 to the host's
routable address, and the second node's join then hangs. Prints ``address <gcs>`` when up,
then obeys lines on stdin: ``remove <ip>`` (kill that node's processes at once, as a lost
machine), ``add <ip>``, ``quit``. Each command is answered by ``ok <command>``.

Usage: python fake_cluster.py NUM_CPUS_PER_NODE
"""

from __future__ import annotations

import sys

from ray.cluster_utils import Cluster

NODE_IPS = ("127.0.0.2", "127.0.0.3")
OBJECT_STORE_BYTES = 80 * 2**20  # the minimum Ray accepts; nothing big goes through it


def main() -> None:
    num_cpus = int(sys.argv[1])
    cluster = Cluster(
        initialize_head=True,
        head_node_args=dict(
            node_ip_address=NODE_IPS[0], num_cpus=num_cpus, include_dashboard=False,
            object_store_memory=OBJECT_STORE_BYTES,
        ),
    )  # fmt: skip
    nodes = {NODE_IPS[0]: cluster.head_node}

    def add(ip: str) -> None:
        nodes[ip] = cluster.add_node(
            node_ip_address=ip, num_cpus=num_cpus, object_store_memory=OBJECT_STORE_BYTES
        )

    add(NODE_IPS[1])
    cluster.wait_for_nodes()
    print(f"address {cluster.address}", flush=True)
    for line in sys.stdin:
        command, _, arg = line.strip().partition(" ")
        if command == "remove":
            cluster.remove_node(nodes.pop(arg), allow_graceful=False)
        elif command == "add":
            add(arg)
            cluster.wait_for_nodes()
        elif command == "quit":
            break
        print(f"ok {line.strip()}", flush=True)
    cluster.shutdown()
    print("ok quit", flush=True)


if __name__ == "__main__":
    main()
