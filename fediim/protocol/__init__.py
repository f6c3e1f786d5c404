"""The federation's wire protocol: messages, bank signing, TLS material, site configuration.

The only place below the Flower apps that imports ``flwr`` or ``cryptography``.
"""
