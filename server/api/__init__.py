"""The gRPC layer: generated stubs (``pb``), the servicer, the error interceptor and the server app.

Only this package imports generated protobuf code.
"""
