//! Configuration layering: defaults < TOML file < S3NET__… environment < flags.

use s3net_server::cli::ServeArgs;
use s3net_server::Config;

/// Tests that read the environment hold this, since one of them sets S3NET__… variables.
static ENV: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn defaults_file_env_and_flags_layer_in_order() {
    let _env = ENV.lock().unwrap_or_else(|p| p.into_inner());
    let c = Config::load(None, &[]).unwrap();
    assert_eq!(c, Config::default());
    assert_eq!(c.server.addr, "127.0.0.1:50051");
    assert_eq!(c.server.max_message_bytes, 64 << 20);
    assert_eq!(c.queue.backend, "memory");

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("s3net.toml");
    std::fs::write(
        &file,
        "[server]\naddr = \"0.0.0.0:6000\"\nshutdown_grace_s = 5\n[queue]\ncapacity = 9\n[workers]\ncpu_workers = 3\n",
    )
    .unwrap();
    std::env::set_var("S3NET__QUEUE__CAPACITY", "11");
    std::env::set_var("S3NET__SERVER__AUTH_TOKEN", "tok");
    std::env::set_var("S3NET__WORKERS__CUDA_GRAPHS", "false");
    std::env::set_var("S3NET__WORKERS__CUDA_GRAPH_MAX_JOBS", "64");
    std::env::set_var("S3NET__WORKERS__GPU_MEMORY_FRACTION", "0.4");
    std::env::set_var("S3NET__WORKERS__FOREGROUND_REFITS", "0");
    let args = ServeArgs {
        config: Some(file.clone()),
        torch_threads: Some(2),
        ..Default::default()
    };
    let c = args.config().unwrap();
    assert_eq!(c.server.addr, "0.0.0.0:6000");
    assert_eq!(c.server.shutdown_grace_s, 5);
    assert_eq!(c.queue.capacity, 11, "environment beats the file");
    assert_eq!(c.server.auth_token.as_deref(), Some("tok"));
    assert_eq!(c.workers.cpu_workers, Some(3));
    assert_eq!(c.workers.torch_threads, Some(2));
    assert_eq!(c.workers.cuda_graphs, Some(false));
    assert_eq!(c.workers.cuda_graph_max_jobs, Some(64));
    assert_eq!(c.workers.gpu_memory_fraction, Some(0.4));
    assert_eq!(c.workers.foreground_refits, Some(0));
    let args = ServeArgs {
        config: Some(file),
        addr: Some("127.0.0.1:7000".into()),
        queue_capacity: Some(2),
        ..Default::default()
    };
    let c = args.config().unwrap();
    assert_eq!(
        (c.server.addr.as_str(), c.queue.capacity),
        ("127.0.0.1:7000", 2),
        "flags beat everything"
    );
    std::env::remove_var("S3NET__QUEUE__CAPACITY");
    std::env::remove_var("S3NET__SERVER__AUTH_TOKEN");
    std::env::remove_var("S3NET__WORKERS__CUDA_GRAPHS");
    std::env::remove_var("S3NET__WORKERS__CUDA_GRAPH_MAX_JOBS");
    std::env::remove_var("S3NET__WORKERS__GPU_MEMORY_FRACTION");
    std::env::remove_var("S3NET__WORKERS__FOREGROUND_REFITS");

    std::fs::write(dir.path().join("bad.toml"), "[server]\nadress = \"x\"\n").unwrap();
    let err = Config::load(Some(&dir.path().join("bad.toml")), &[]).unwrap_err();
    assert!(format!("{err:#}").contains("adress"), "{err:#}");
    assert!(Config::load(Some(&dir.path().join("missing.toml")), &[]).is_err());
}

/// The subcommands as the `s3net` binary mounts them (with its global `--threads`).
#[derive(clap::Parser)]
#[command(name = "s3net")]
struct Cli {
    #[arg(long, global = true)]
    threads: Option<i32>,
    #[command(subcommand)]
    command: Command,
}

// Parsed once per test: the size of its largest variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(clap::Subcommand)]
enum Command {
    Serve(ServeArgs),
    #[command(subcommand)]
    Client(s3net_server::cli::ClientCommand),
}

#[test]
fn command_line_definitions_are_consistent() {
    use clap::{CommandFactory, Parser};
    use s3net_server::cli::ClientCommand;
    Cli::command().debug_assert();
    let cli = Cli::try_parse_from([
        "s3net",
        "client",
        "segment",
        "--addr",
        "http://10.0.0.1:50051",
        "ct.dcm",
        "--out",
        "out",
        "--iterations",
        "3",
        "--window",
        "-600,1500",
        "--device",
        "cpu",
        "--priority",
        "-2",
        "--retries",
        "5",
    ])
    .unwrap();
    let Command::Client(ClientCommand::Segment {
        conn, files, concurrency, fit, retry, ..
    }) = cli.command
    else {
        panic!()
    };
    assert_eq!((retry.retries, retry.backoff), (5, 0.5));
    assert_eq!(conn.addr, "http://10.0.0.1:50051");
    assert_eq!(files, [std::path::PathBuf::from("ct.dcm")]);
    assert_eq!(concurrency, 4, "the Python CLI's default too");
    let o = fit.options().unwrap();
    assert_eq!(
        (o.iterations, o.priority, o.device.as_str()),
        (Some(3), -2, "cpu")
    );
    assert_eq!(
        o.window.map(|w| (w.center, w.width)),
        Some((-600.0, 1500.0))
    );
    let cli = Cli::try_parse_from([
        "s3net",
        "serve",
        "--addr",
        "0.0.0.0:1",
        "--cpu-workers",
        "2",
    ])
    .unwrap();
    let Command::Serve(a) = cli.command else {
        panic!()
    };
    assert_eq!(
        (a.addr.as_deref(), a.cpu_workers),
        (Some("0.0.0.0:1"), Some(2))
    );
    let cli = Cli::try_parse_from([
        "s3net",
        "serve",
        "--metrics-listen",
        "",
        "--otlp-endpoint",
        "http://otel-collector:4317",
    ])
    .unwrap();
    let Command::Serve(a) = cli.command else {
        panic!()
    };
    assert_eq!(
        (a.metrics_listen.as_deref(), a.otlp_endpoint.as_deref()),
        (Some(""), Some("http://otel-collector:4317"))
    );
    for args in [
        &[
            "s3net",
            "client",
            "submit",
            "a.png",
            "--idempotency-key",
            "k",
        ][..],
        &["s3net", "client", "watch", "abc"],
        &["s3net", "client", "get", "abc", "--out", "d"],
        &["s3net", "client", "cancel", "abc"],
        &["s3net", "client", "list"],
        &["s3net", "client", "list", "--token-file", "/run/secrets/s3net-token"],
        &[
            "s3net",
            "client",
            "health",
            "--addr",
            "https://h:1",
            "--ca",
            "ca.pem",
            "--cert",
            "c.pem",
            "--key",
            "k.pem",
        ],
    ] {
        Cli::try_parse_from(args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
    }
    let both = Cli::try_parse_from(["s3net", "client", "list", "--token", "t", "--token-file", "f"]);
    assert!(both.is_err(), "--token and --token-file: the token one way or the other");
}

#[test]
fn the_example_config_is_the_default() {
    let _env = ENV.lock().unwrap_or_else(|p| p.into_inner());
    let file = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config.example.toml");
    assert_eq!(Config::load(Some(&file), &[]).unwrap(), Config::default());
}

#[test]
fn observability_keys_layer_and_are_checked() {
    let _env = ENV.lock().unwrap_or_else(|p| p.into_inner());
    let c = Config::default();
    assert_eq!(c.metrics.listen(), Some("127.0.0.1:9464"));
    assert_eq!(c.telemetry.endpoint(), None);
    assert_eq!(
        (c.telemetry.service_name.as_str(), c.telemetry.sample_ratio),
        ("s3net", 1.0)
    );

    std::env::set_var("S3NET__METRICS__LISTEN", "0.0.0.0:9100");
    std::env::set_var(
        "S3NET__TELEMETRY__OTLP_ENDPOINT",
        "http://otel-collector:4317",
    );
    std::env::set_var("S3NET__TELEMETRY__SAMPLE_RATIO", "0.25");
    let c = Config::load(None, &[]);
    std::env::remove_var("S3NET__METRICS__LISTEN");
    std::env::remove_var("S3NET__TELEMETRY__OTLP_ENDPOINT");
    std::env::remove_var("S3NET__TELEMETRY__SAMPLE_RATIO");
    let c = c.unwrap();
    assert_eq!(c.metrics.listen(), Some("0.0.0.0:9100"));
    assert_eq!(c.telemetry.endpoint(), Some("http://otel-collector:4317"));
    assert_eq!(c.telemetry.sample_ratio, 0.25);

    // The flags, and "" switching each off.
    let args = ServeArgs {
        metrics_listen: Some(String::new()),
        otlp_endpoint: Some("https://collector.example:4317".into()),
        ..Default::default()
    };
    let c = args.config().unwrap();
    assert_eq!(c.metrics.listen(), None);
    assert_eq!(
        c.telemetry.endpoint(),
        Some("https://collector.example:4317")
    );
    let c = Config::load(None, &[("telemetry.otlp_endpoint", String::new())]).unwrap();
    assert_eq!(c.telemetry.endpoint(), None);
    for ok in ["localhost:9464", "[::1]:9464", "metrics.internal:1"] {
        Config::load(None, &[("metrics.listen", ok.into())])
            .unwrap_or_else(|e| panic!("{ok}: {e:#}"));
    }

    // Bad values name their key.
    for (key, bad) in [
        ("metrics.listen", "9464"),
        ("metrics.listen", "localhost:http"),
        ("metrics.listen", "0.0.0.0:99999"),
        ("telemetry.otlp_endpoint", "otel-collector:4317"),
        ("telemetry.otlp_endpoint", "ftp://otel-collector:4317"),
        ("telemetry.sample_ratio", "1.5"),
        ("telemetry.sample_ratio", "-0.1"),
        ("telemetry.service_name", " "),
    ] {
        let err = Config::load(None, &[(key, bad.to_string())])
            .expect_err(&format!("{key} = {bad:?} accepted"));
        assert!(format!("{err:#}").contains(key), "{key} = {bad:?}: {err:#}");
    }
}

/// The CPU workers' memory budget per job: set, or shared out of the host's memory; and the
/// host's memory as this machine reports it.
#[test]
fn cpu_job_memory_budget() {
    let _env = ENV.lock().unwrap_or_else(|p| p.into_inner());
    let gb = 1u64 << 30;
    let mut w = Config::default().workers;
    // 4/5 of 16 GiB less the runtime's 600 MiB: 12.2 GiB, for one job or shared by four.
    let one = w.cpu_job_bytes(1, Some(16 * gb)).unwrap();
    assert_eq!(one, 16 * gb / 5 * 4 - (600 << 20));
    assert_eq!(w.cpu_job_bytes(2, Some(16 * gb)), Some(one / 2));
    w.cpu_batch = Some(2);
    assert_eq!(w.cpu_job_bytes(2, Some(16 * gb)), Some(one / 4));
    assert_eq!(w.cpu_job_bytes(1, None), None);
    assert_eq!(w.cpu_job_bytes(1, Some(gb / 2)), Some(0), "a tiny host takes nothing large");
    w.max_job_bytes = Some(3 * gb);
    assert_eq!(w.cpu_job_bytes(4, Some(16 * gb)), Some(3 * gb), "the setting wins");
    assert_eq!(w.cpu_job_bytes(4, None), Some(3 * gb));

    std::env::set_var("S3NET__WORKERS__MAX_JOB_BYTES", "5000000000");
    let c = Config::load(None, &[]);
    std::env::remove_var("S3NET__WORKERS__MAX_JOB_BYTES");
    assert_eq!(c.unwrap().workers.max_job_bytes, Some(5_000_000_000));
    let err = Config::load(None, &[("workers.max_job_bytes", "0".into())]).unwrap_err();
    assert!(format!("{err:#}").contains("workers.max_job_bytes"), "{err:#}");

    // Linux: MemTotal (or a smaller cgroup limit), somewhere between 256 MiB and 64 TiB.
    if cfg!(target_os = "linux") {
        let host = s3net_server::config::host_memory_bytes().expect("/proc/meminfo is readable");
        assert!((256 << 20..64 << 40).contains(&host), "{host}");
    }
}

/// A queue with no place would refuse every job as full: refused at start, naming the key.
#[test]
fn the_queue_has_a_place() {
    let _env = ENV.lock().unwrap_or_else(|p| p.into_inner());
    let err = Config::load(None, &[("queue.capacity", "0".into())]).unwrap_err();
    assert!(format!("{err:#}").contains("queue.capacity must be at least 1"), "{err:#}");
    Config::load(None, &[("queue.capacity", "1".into())]).expect("one place");
}

/// The byte budget of requests in transit has room for the largest upload and one message.
#[test]
fn upload_budget_holds_the_largest_upload() {
    let _env = ENV.lock().unwrap_or_else(|p| p.into_inner());
    for bytes in ["1000", "268435456"] {
        let err = Config::load(None, &[("server.max_upload_bytes_in_flight", bytes.into())]).unwrap_err();
        let msg = format!("{err:#}");
        let expect = format!(
            "server.max_upload_bytes_in_flight ({bytes}) must be at least server.max_upload_bytes + \
             server.max_message_bytes (268435456 + 67108864)"
        );
        assert!(msg.contains(&expect), "{msg}");
    }
    Config::load(None, &[("server.max_upload_bytes_in_flight", (335544320u64).to_string())]).expect("exactly enough");
}

/// HTTP/2's window: 8 MiB unless set, from the environment too, and within what HTTP/2 allows.
#[test]
fn the_http2_window_loads_and_is_checked() {
    let _env = ENV.lock().unwrap_or_else(|p| p.into_inner());
    assert_eq!(Config::load(None, &[]).unwrap().server.http2_window_bytes, 8 << 20);
    std::env::set_var("S3NET__SERVER__HTTP2_WINDOW_BYTES", "2097152");
    let c = Config::load(None, &[]);
    std::env::remove_var("S3NET__SERVER__HTTP2_WINDOW_BYTES");
    assert_eq!(c.unwrap().server.http2_window_bytes, 2 << 20);
    for bad in ["1000", "2147483648"] {
        let err = Config::load(None, &[("server.http2_window_bytes", bad.into())]).unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("server.http2_window_bytes"), "{bad}: {msg}");
    }
}

/// `[defaults]`: fit options for the requests that leave them unset, from the file or the
/// environment, checked when the configuration loads.
#[test]
fn fit_defaults_load_and_are_checked() {
    let _env = ENV.lock().unwrap_or_else(|p| p.into_inner());
    assert_eq!(Config::default().defaults, s3net_server::config::DefaultsConfig::default());
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("s3net.toml");
    std::fs::write(&file, "[defaults]\nsize = 128\niterations = 30\n").unwrap();
    std::env::set_var("S3NET__DEFAULTS__PRECISION", "bfloat16");
    let c = Config::load(Some(&file), &[]);
    std::env::remove_var("S3NET__DEFAULTS__PRECISION");
    let d = c.unwrap().defaults;
    assert_eq!((d.size, d.iterations, d.precision.as_deref()), (Some(128), Some(30), Some("bfloat16")));
    for (key, value, needle) in [
        ("defaults.size", "8", "size must be in 16..=1024"),
        ("defaults.precision", "fp8", "unknown precision 'fp8'"),
        ("defaults.preset", "fastest", "unknown preset 'fastest'"),
        ("defaults.features", "1", "features must be in 2..=256"),
    ] {
        let err = Config::load(None, &[(key, value.into())]).unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("defaults: ") && msg.contains(needle), "{key} = {value}: {msg}");
    }
}

#[test]
fn the_printed_configuration_loads_back_with_the_token_redacted() {
    let _env = ENV.lock().unwrap_or_else(|p| p.into_inner());
    let mut c = Config::default();
    c.server.max_connections = 7;
    c.server.auth_token = Some("secret-token".into());
    c.workers.gpu_batch = Some(4);
    c.workers.gpu_memory_fraction = Some(0.5);
    c.defaults.size = Some(192);
    c.telemetry.sample_ratio = 0.25;
    let text = c.to_toml().unwrap();
    assert!(!text.contains("secret-token"), "{text}");
    assert!(text.contains("auth_token = \"<redacted>\""), "{text}");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("printed.toml");
    std::fs::write(&file, &text).unwrap();
    let back = Config::load(Some(&file), &[]).unwrap();
    c.server.auth_token = Some("<redacted>".into());
    assert_eq!(back, c, "{text}");
    // The default configuration, too: every section present, nothing that does not load.
    let text = Config::default().to_toml().unwrap();
    std::fs::write(&file, &text).unwrap();
    assert_eq!(Config::load(Some(&file), &[]).unwrap(), Config::default(), "{text}");
}

#[test]
fn cluster_keys_load_and_are_checked() {
    let _env = ENV.lock().unwrap_or_else(|p| p.into_inner());
    assert!(!Config::default().cluster.enabled());
    // The peers as a list from one variable, the pod's IP from another (the Kubernetes way).
    std::env::set_var("S3NET__CLUSTER__PEERS", "s3net-peers.s3net.svc.cluster.local:50051,10.0.0.7:50051");
    std::env::set_var("S3NET__CLUSTER__ADVERTISE_ADDR", "10.0.0.5");
    std::env::set_var("S3NET__SERVER__AUTH_TOKEN", "a,b");
    let c = Config::load(None, &[]);
    std::env::remove_var("S3NET__CLUSTER__PEERS");
    std::env::remove_var("S3NET__CLUSTER__ADVERTISE_ADDR");
    std::env::remove_var("S3NET__SERVER__AUTH_TOKEN");
    let c = c.unwrap();
    assert_eq!(c.cluster.peers, ["s3net-peers.s3net.svc.cluster.local:50051", "10.0.0.7:50051"]);
    assert_eq!(c.server.auth_token.as_deref(), Some("a,b"), "only the peers are a list");
    assert_eq!(c.cluster.advertised(50051).unwrap(), "10.0.0.5:50051".parse().unwrap());
    for ok in ["fd00::5", "[fd00::5]:6000", "10.0.0.5:6000"] {
        let mut c = Config::default();
        c.cluster.peers = vec!["s3net-peers:50051".into()];
        c.cluster.advertise_addr = ok.into();
        c.validate().unwrap_or_else(|e| panic!("{ok}: {e:#}"));
    }
    // Bad values name their key.
    let cases: [(&[&str], &str, bool, &str); 6] = [
        (&["s3net-peers:50051"], "", false, "cluster.advertise_addr"),
        (&[], "10.0.0.5", false, "cluster.advertise_addr"),
        (&["s3net-peers"], "10.0.0.5", false, "cluster.peers"),
        (&["s3net-peers:50051"], "pod-5", false, "cluster.advertise_addr"),
        (&["s3net-peers:50051"], "0.0.0.0", false, "cluster.advertise_addr"),
        (&["s3net-peers:50051"], "10.0.0.5", true, "cluster.ca"),
    ];
    for (peers, advertise, tls, key) in cases {
        let mut c = Config::default();
        c.cluster.peers = peers.iter().map(|p| p.to_string()).collect();
        c.cluster.advertise_addr = advertise.into();
        if tls {
            c.server.tls = Some(s3net_server::config::TlsConfig { cert: "c.pem".into(), key: "k.pem".into(), client_ca: None });
        }
        let err = c.validate().expect_err(&format!("{peers:?} {advertise:?} accepted"));
        assert!(format!("{err:#}").contains(key), "{peers:?} {advertise:?}: {err:#}");
    }
}

/// `[server.callers]` from a file and from `S3NET__SERVER__CALLERS__NAME__…` variables (the
/// Kubernetes Secret's way), checked, and printed without their tokens.
#[test]
fn callers_load_from_file_and_environment_and_are_checked() {
    let _env = ENV.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("s3net.toml");
    std::fs::write(
        &file,
        "[server.tls]\ncert = \"s.pem\"\nkey = \"s.key\"\nclient_ca = \"ca.pem\"\n\
         [server.callers.pacs-bridge]\ntoken = \"bridge-secret\"\ncertificate_names = [\"pacs-bridge.hospital.example\"]\nweight = 3\n\
         [server.callers.research]\ntoken = \"file-token\"\nmax_active_jobs = 8\nmax_priority = -1\n",
    )
    .unwrap();
    let vars = [
        ("S3NET__SERVER__CALLERS__RESEARCH__TOKEN", "env-token"),
        ("S3NET__SERVER__CALLERS__ON_CALL__TOKEN", "ops-secret"),
        ("S3NET__SERVER__CALLERS__ON_CALL__OPERATOR", "true"),
        ("S3NET__SERVER__CALLERS__MODALITY__CERTIFICATE_NAMES", "ct-1.hospital.example, CT Scanner 1"),
        ("S3NET__SERVER__CALLERS__MODALITY__WEIGHT", "2"),
    ];
    for (k, v) in vars {
        std::env::set_var(k, v);
    }
    let c = Config::load(Some(&file), &[]);
    for (k, _) in vars {
        std::env::remove_var(k);
    }
    let c = c.unwrap();
    let names: Vec<&str> = c.server.callers.keys().map(String::as_str).collect();
    assert_eq!(names, ["modality", "on_call", "pacs-bridge", "research"]);
    let (modality, bridge) = (&c.server.callers["modality"], &c.server.callers["pacs-bridge"]);
    assert_eq!(modality.certificate_names, ["ct-1.hospital.example", "CT Scanner 1"], "a variable's names, comma-separated");
    assert_eq!((modality.token.as_str(), modality.weight), ("", 2), "no token: its certificate names it");
    assert_eq!((bridge.certificate_names.as_slice(), bridge.weight, c.server.callers["research"].weight), (&["pacs-bridge.hospital.example".to_string()][..], 3, 1));
    let research = &c.server.callers["research"];
    assert_eq!((research.token.as_str(), research.max_active_jobs, research.operator), ("env-token", 8, false), "the variable beats the file");
    assert!(c.server.callers["on_call"].operator);
    assert_eq!(c.server.callers["pacs-bridge"].max_active_jobs, 0, "no limit unless set");
    assert_eq!((research.max_priority, c.server.callers["pacs-bridge"].max_priority), (Some(-1), None));

    let text = c.to_toml().unwrap();
    for secret in ["bridge-secret", "env-token", "ops-secret"] {
        assert!(!text.contains(secret), "{text}");
    }
    let printed = dir.path().join("printed.toml");
    std::fs::write(&printed, &text).unwrap();
    assert!(text.contains("token = \"<redacted server.callers.research.token>\""), "{text}");
    let back = Config::load(Some(&printed), &[]).unwrap();
    let mut redacted = c.clone();
    for (name, caller) in redacted.server.callers.iter_mut().filter(|(_, c)| !c.token.is_empty()) {
        caller.token = format!("<redacted server.callers.{name}.token>");
    }
    assert!(!text.contains("<redacted server.callers.modality.token>"), "no token, nothing to redact: {text}");
    assert_eq!(back, redacted, "{text}");

    let check = |edit: &dyn Fn(&mut Config)| {
        let mut c = Config::default();
        c.server.callers.insert("research".into(), s3net_server::config::CallerConfig { token: "t1".into(), ..Default::default() });
        edit(&mut c);
        c.validate().map_err(|e| format!("{e:#}"))
    };
    check(&|_| {}).unwrap();
    fn add(c: &mut Config, name: &str, token: &str) {
        c.server.callers.insert(name.into(), s3net_server::config::CallerConfig { token: token.into(), ..Default::default() });
    }
    fn certificates(c: &mut Config, name: &str, names: &[&str]) {
        let names = names.iter().map(|n| n.to_string()).collect();
        c.server.callers.insert(name.into(), s3net_server::config::CallerConfig { certificate_names: names, ..Default::default() });
    }
    fn mutual_tls(c: &mut Config) {
        c.server.tls = Some(s3net_server::config::TlsConfig { cert: "s.pem".into(), key: "s.key".into(), client_ca: Some("ca.pem".into()) });
    }
    check(&|c| {
        mutual_tls(c);
        certificates(c, "pacs", &["pacs-bridge.hospital.example", "PACS Bridge"]);
        c.server.callers.get_mut("research").unwrap().weight = 1000;
    })
    .expect("a caller known by its certificate alone, a weight of 1000");
    type Edit = fn(&mut Config);
    let cases: [(Edit, &str); 15] = [
        (|c| c.queue.max_caller_share = 0.0, "queue.max_caller_share must be above 0 and at most 1, got 0"),
        (|c| c.queue.max_caller_share = 1.5, "got 1.5"),
        (|c| add(c, "clinic", ""), "server.callers.clinic needs a token (server.callers.clinic.token or .token_file) or the names of its client certificate"),
        (|c| c.server.callers.get_mut("research").unwrap().weight = 0, "server.callers.research.weight must be between 1 and 1000, got 0"),
        (|c| c.server.callers.get_mut("research").unwrap().weight = 1001, "got 1001"),
        (|c| certificates(c, "pacs", &["pacs"]), "server.callers.pacs.certificate_names needs mutual TLS (server.tls.client_ca)"),
        (|c| {
            mutual_tls(c);
            certificates(c, "pacs", &[" "]);
        }, "server.callers.pacs.certificate_names: a name must not be empty"),
        (|c| {
            mutual_tls(c);
            certificates(c, "pacs", &["Bridge"]);
            certificates(c, "ris", &["bridge"]);
        }, "server.callers.ris.certificate_names and server.callers.pacs.certificate_names both hold \"bridge\""),
        (|c| {
            mutual_tls(c);
            certificates(c, "pacs", &["bridge"]);
            c.cluster.peers = vec!["10.0.0.1:50051".into(), "10.0.0.2:50051".into()];
            c.cluster.advertise_addr = "10.0.0.1".into();
            c.cluster.ca = Some("ca.pem".into());
        }, "server.callers.pacs.certificate_names in a cluster needs server.auth_token"),
        (|c| add(c, "Research", "t2"), "a caller's name must be lowercase letters"),
        (|c| add(c, "-x", "t2"), "starting with a letter or digit, got \"-x\""),
        (|c| add(c, "service", "t2"), "\"service\" is the name of server.auth_token's caller"),
        (|c| add(c, "clinic", " "), "server.callers.clinic.token must not be empty"),
        (|c| add(c, "clinic", "t1"), "server.callers.research.token is the same as server.callers.clinic.token"),
        (|c| c.server.auth_token = Some("t1".into()), "server.callers.research.token is the same as server.auth_token"),
    ];
    for (edit, expected) in cases {
        let e = check(&edit).unwrap_err();
        assert!(e.contains(expected), "{e}");
    }
}

/// `server.auth_token_file` and `server.callers.NAME.token_file`: tokens read from a file
/// (a mounted Kubernetes Secret's key), one per line, trimmed, never printed (a caller's file
/// may hold several, each the caller's, as during a rotation), and a file that cannot be a
/// token refused naming the key and the path.
#[test]
fn tokens_load_from_files_and_are_checked() {
    let _env = ENV.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let secret = |name: &str, content: &[u8]| {
        let p = dir.path().join(name);
        std::fs::write(&p, content).unwrap();
        p
    };
    let (pacs, svc) = (secret("pacs", b"pacs-secret\n\n  pacs-next-secret \r\npacs-secret\n"), secret("svc", b"  svc-secret \r\n"));
    let file = dir.path().join("s3net.toml");
    let write = |text: String| std::fs::write(&file, text).unwrap();
    write(format!(
        "[server]\nauth_token_file = {svc:?}\nreload_interval_s = 5\n[server.callers.pacs]\ntoken_file = {pacs:?}\nweight = 2\n"
    ));
    let c = Config::load(Some(&file), &[]).unwrap();
    assert_eq!(c.server.auth_token.as_deref(), Some("svc-secret"), "surrounding whitespace left out");
    let p = &c.server.callers["pacs"];
    assert_eq!((p.token.as_str(), p.file_tokens.as_slice(), p.weight), ("", &["pacs-secret".to_string(), "pacs-next-secret".to_string()][..], 2), "a token a line, blank lines and repeats left out");
    assert_eq!(p.tokens().collect::<Vec<_>>(), ["pacs-secret", "pacs-next-secret"]);
    assert_eq!(c.server.reload_interval_s, 5);
    assert_eq!(Config::default().server.reload_interval_s, 0, "on SIGHUP only by default");

    let text = c.to_toml().unwrap();
    assert!(!text.contains("secret\"") && !text.contains("redacted"), "the files are named, the tokens left out: {text}");
    assert!(text.contains(&format!("token_file = {pacs:?}")), "{text}");
    let printed = dir.path().join("printed.toml");
    std::fs::write(&printed, &text).unwrap();
    assert_eq!(Config::load(Some(&printed), &[]).unwrap(), c, "the printed file reads the same files: {text}");

    let refused = |text: String| {
        write(text);
        format!("{:#}", Config::load(Some(&file), &[]).unwrap_err())
    };
    let caller = |token_file: &std::path::Path| format!("[server.callers.pacs]\ntoken_file = {token_file:?}\n");
    let missing = dir.path().join("missing");
    let cases = [
        (format!("{}token = \"inline-secret\"\n", caller(&pacs)), "server.callers.pacs.token and server.callers.pacs.token_file are both set".to_string()),
        (format!("[server]\nauth_token = \"inline-secret\"\nauth_token_file = {svc:?}\n"), "server.auth_token and server.auth_token_file are both set".to_string()),
        (caller(&missing), format!("server.callers.pacs.token_file: cannot read {}", missing.display())),
        (format!("[server]\nauth_token_file = {missing:?}\n"), format!("server.auth_token_file: cannot read {}", missing.display())),
        (caller(&secret("blank", b" \n\t\n")), "server.callers.pacs.token_file: ".to_string() + &dir.path().join("blank").display().to_string() + " is empty"),
        (caller(&secret("binary", &[0xff, 0xfe, 0x00])), " is not UTF-8 text".to_string()),
        (caller(&secret("huge", &vec![b'x'; 70_000])), "holds 70000 bytes, more than a token (65536 at most)".to_string()),
        (caller(dir.path()), "server.callers.pacs.token_file: cannot read".to_string()),
        (format!("[server]\nauth_token_file = {:?}\n{}", secret("service", b"service-secret\npacs-secret\n"), caller(&pacs)), "server.callers.pacs.token_file holds the same token as server.auth_token_file".to_string()),
        (format!("{}[server.callers.ris]\ntoken_file = {:?}\n", caller(&pacs), secret("ris", b"ris-secret\npacs-next-secret\n")), "server.callers.ris.token_file holds the same token as server.callers.pacs.token_file".to_string()),
    ];
    for (text, expected) in cases {
        let e = refused(text);
        assert!(e.contains(&expected), "{e}");
        assert!(!e.contains("secret"), "no token in an error: {e}");
    }
    // The service's file: its first line sent to the other replicas, every line accepted.
    write(format!("[server]\nauth_token_file = {:?}\n", secret("rotating", b"next-secret\nsvc-secret\n")));
    let c = Config::load(Some(&file), &[]).unwrap();
    assert_eq!((c.server.auth_token.as_deref(), c.server.auth_tokens_accepted.as_slice()), (Some("next-secret"), &["svc-secret".to_string()][..]));
    assert_eq!(c.server.service_tokens(), ["next-secret", "svc-secret"]);
    // Read before the checks: a file's token counts as the caller's token there too.
    let e = refused(format!("[server]\nauth_token_file = {:?}\n{}", secret("shared", b"pacs-next-secret"), caller(&pacs)));
    assert!(e.contains("server.callers.pacs.token_file holds the same token as server.auth_token_file"), "{e}");
}
