"""Wire messages: one module per link, msgpack on the wire, a version in every tag.

Links: client -> gateway (`request`), gateway -> encoder (`encode`), encoder or
gateway -> prefill (`prefill`), prefill -> decode (`decode`), any stage -> client
(`reply`), broadcast cancel (`control`). Tensors never ride here: messages hold
handles (`common.TensorHandle`) and the connectors move the bytes.
"""
