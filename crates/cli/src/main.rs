//! `s3net`: segment images, evaluate against ground truth, benchmark.

mod bench;
mod eval;
mod fitargs;
mod segment;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "s3net", version, about = "Label-free segmentation of 2D medical images (S3-Net, per-image self-supervised fit)")]
struct Cli {
    /// libtorch CPU threads (default: all cores).
    #[arg(long, global = true)]
    threads: Option<i32>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Fit each image and write STEM.labels.png, STEM.mask.png and STEM.json.
    Segment(segment::SegmentArgs),
    /// Fit every image of a folder and score it against ground-truth masks.
    Eval(eval::EvalArgs),
    /// Timing benchmarks (per-iteration fit time, deformable-conv op).
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Run the gRPC service until SIGTERM/SIGINT (config: --config FILE, S3NET__SECTION__KEY, flags).
    Serve(s3net_server::cli::ServeArgs),
    /// Talk to a running service: segment, submit, watch, get, cancel, list, health.
    #[command(subcommand)]
    Client(s3net_server::cli::ClientCommand),
}

fn main() {
    let cli = Cli::parse();
    s3net_model::tune_allocator();
    if let Some(t) = cli.threads {
        tch::set_num_threads(t.max(1));
    }
    let result = match cli.command {
        Command::Segment(a) => segment::run(a),
        Command::Eval(a) => eval::run(a),
        Command::Bench(b) => bench::run(b),
        // The server sets libtorch's threads from its configuration (workers.torch_threads),
        // after this: `--threads` given to `serve` means that setting, unless
        // `--torch-threads` says otherwise.
        Command::Serve(mut a) => {
            a.torch_threads = a.torch_threads.or(cli.threads.map(|t| t.max(1) as usize));
            s3net_server::cli::run_serve(a)
        }
        Command::Client(c) => s3net_server::cli::run_client(c),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
