"""The federation's wire protocol: messages, bank signing, TLS material, site configuration,
secure aggregation (:mod:`fediim.protocol.secure_sum`).

The only place below the Flower apps that imports ``flwr`` or ``cryptography``.
"""
