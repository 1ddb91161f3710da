"""The collector agent: sources → parse → route/filter → buffer → Kafka sink."""
