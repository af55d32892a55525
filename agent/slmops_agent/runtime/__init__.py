"""The inference runtime: an onnxruntime-genai model loaded from a slot folder, and the host that
serves the active one (a bounded FIFO queue, one turn at a time: a request alone or a batch of the
requests waiting together, hot swap).

    requests   a request, its limits and validation, its result, its cancel flag
    stops      stop sequences in streamed text
    spinning   whether onnxruntime's threads may spin (decided from the machine's load)
    genai      the lazy import of onnxruntime-genai
    memory     the heap's free pages given back after a turn (malloc_trim)
    decoding   one request's side of the token loop (stops, budget, streamed text, timings)
    model      the loaded model and the token loop of one request
    batching   several requests decoded together on onnxruntime-genai's Engine
    queue      the bounded queue of turns
    metrics    inference counters
    host       the model host: the queue, batching, hot swap
"""
