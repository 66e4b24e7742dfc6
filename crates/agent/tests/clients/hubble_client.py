"""A stock gRPC client for the Observer API: Python's grpcio with messages that protoc
generated from Weir's observer.proto (the caller runs protoc into GEN_DIR first).

Usage: hubble_client.py GEN_DIR SOCKET_PATH DESTINATION_PORT
Prints one JSON object: the server status and the dropped flows to that port.
"""

import json
import sys

import grpc

sys.path.insert(0, sys.argv[1])
from flow import flow_pb2  # noqa: E402
from observer import observer_pb2  # noqa: E402

socket_path, port = sys.argv[2], sys.argv[3]
channel = grpc.insecure_channel("unix:" + socket_path)
server_status = channel.unary_unary(
    "/observer.Observer/ServerStatus",
    request_serializer=observer_pb2.ServerStatusRequest.SerializeToString,
    response_deserializer=observer_pb2.ServerStatusResponse.FromString,
)
get_flows = channel.unary_stream(
    "/observer.Observer/GetFlows",
    request_serializer=observer_pb2.GetFlowsRequest.SerializeToString,
    response_deserializer=observer_pb2.GetFlowsResponse.FromString,
)

status = server_status(observer_pb2.ServerStatusRequest(), timeout=10)
request = observer_pb2.GetFlowsRequest(
    number=100,
    whitelist=[
        flow_pb2.FlowFilter(verdict=[flow_pb2.DROPPED], destination_port=[port])
    ],
)
flows = []
for response in get_flows(request, timeout=10):
    if response.WhichOneof("response_types") != "flow":
        continue
    f = response.flow
    flows.append(
        {
            "verdict": flow_pb2.Verdict.Name(f.verdict),
            "drop_reason": f.drop_reason_desc,
            "source_pod": f.source.pod_name,
            "destination_pod": f.destination.pod_name,
            "destination_port": f.l4.TCP.destination_port,
            "node_name": f.node_name,
        }
    )
print(
    json.dumps(
        {
            "max_flows": status.max_flows,
            "num_flows": status.num_flows,
            "seen_flows": status.seen_flows,
            "flows": flows,
        }
    )
)
