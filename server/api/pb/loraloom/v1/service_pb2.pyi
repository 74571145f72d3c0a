from server.api.pb.loraloom.v1 import adapters_pb2 as _adapters_pb2
from server.api.pb.loraloom.v1 import generate_pb2 as _generate_pb2
from server.api.pb.loraloom.v1 import server_pb2 as _server_pb2
from google.protobuf import descriptor as _descriptor
from typing import ClassVar as _ClassVar

DESCRIPTOR: _descriptor.FileDescriptor
