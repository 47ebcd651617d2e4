//! A worker on a phone, its battery, charger and temperature read from a
//! fake sysfs tree in a temporary directory: it stops taking tasks below
//! its battery level and above its temperature, hands back the task it is
//! running, says so in its advert so that clients pass it over, and works
//! again when conditions return; a job whose worker pauses mid-shard ends
//! with the adapter it would have had anyway.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use node::config::{Config, Fault, PowerPolicy};
use node::daemon::NodeHandle;
use node::job::submit::submit;
use node::job::{self, Event, Verify};
use protocol::{Power, PublicKey, TaskStatus};
use tern_tests::{
    adapter_of, assert_eventually, infer_task, reference, setup, shard_task, spawn_nodes, tempdir, tiny_model,
    wait_for_swarm,
};

const WAIT: Duration = Duration::from_secs(60);
/// Long enough for the power loop (one reading a second) to act.
const ACT: Duration = Duration::from_secs(10);

/// A phone's `/sys/class`: a battery, a USB charger and a thermal zone.
struct Phone(PathBuf);

impl Phone {
    fn new(name: &str) -> Self {
        let p = Self(tempdir(name));
        p.set(80, false, 30.0);
        p
    }

    /// Battery at `capacity`%, charging when `charger`, at `celsius`. Each
    /// file is replaced whole (written beside it, then renamed) so that a
    /// reading never sees half a value.
    fn set(&self, capacity: u32, charger: bool, celsius: f32) {
        let status = if charger { "Charging" } else { "Discharging" };
        let files = [
            ("power_supply/battery/type", "Battery".to_string()),
            ("power_supply/battery/capacity", capacity.to_string()),
            ("power_supply/battery/status", status.to_string()),
            ("power_supply/usb/type", "USB".to_string()),
            ("power_supply/usb/online", u8::from(charger).to_string()),
            ("thermal/thermal_zone0/type", "cpu-thermal".to_string()),
            ("thermal/thermal_zone0/temp", ((celsius * 1000.0) as i64).to_string()),
        ];
        for (path, value) in files {
            let path = self.0.join(path);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, format!("{value}\n")).unwrap();
            std::fs::rename(&tmp, &path).unwrap();
        }
    }

    /// A policy like the `phone` profile's, read from this tree every second.
    fn policy(&self) -> PowerPolicy {
        PowerPolicy {
            min_battery_percent: 30,
            pause_above_celsius: 45.0,
            resume_below_celsius: 40.0,
            check_secs: 1,
            sysfs: self.0.clone(),
            ..PowerPolicy::default()
        }
    }
}

fn paused(n: &NodeHandle) -> Option<String> {
    n.shared.worker.paused.borrow().clone()
}

/// Whether `client` would give a task on `model` to `worker` now.
fn chosen(client: &NodeHandle, model: &protocol::ContentId, worker: PublicKey) -> bool {
    job::capable_peers(&client.shared.client, model, 0, &[])
        .iter()
        .any(|(k, _)| *k == worker)
}

async fn infer_status(client: &NodeHandle, worker: PublicKey, model: protocol::ContentId) -> (TaskStatus, String) {
    let sub = submit(&client.shared.client, infer_task(worker, model), 1 << 20)
        .await
        .expect("the worker answers");
    (sub.result.status, sub.result.error)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_phone_pauses_below_its_battery_level_and_when_hot_hands_back_its_task_and_resumes() {
    let phone = Phone::new("phone");
    let policy = phone.policy();
    let nodes = spawn_nodes(2, |i, c: &mut Config| {
        if i == 1 {
            c.power = policy.clone();
            c.limits.max_tasks = 1;
        }
    })
    .await;
    let (client, worker) = (&nodes[0], &nodes[1]);
    let key = worker.public_key();
    let model_path = tiny_model(&tempdir("phone-model"));
    let (model, _) = client.shared.store.import_file(&model_path).unwrap();

    // The client sees a phone on battery that stops below 30%.
    assert_eventually(WAIT, "the client sees the phone's battery", || {
        client.peers().iter().any(|(k, e)| {
            let a = &e.advert;
            *k == key
                && a.power == Power::Battery
                && a.availability.battery_percent == 80
                && a.availability.stops_below_battery_percent == 30
                && a.availability.paused.is_empty()
        })
    })
    .await;
    assert!(chosen(client, &model, key));
    assert_eq!(infer_status(client, key, model).await.0, TaskStatus::Done);

    // A long training runs; the battery falls below 30% meanwhile.
    let long = shard_task(&client.shared, key, &model_path, 8, None);
    let drain = async {
        assert_eventually(WAIT, "the training started", || {
            worker.shared.worker.computing.load(Ordering::SeqCst) == 1
        })
        .await;
        phone.set(25, false, 30.0);
    };
    let (sub, ()) = tokio::join!(submit(&client.shared.client, long, 1 << 30), drain);
    let sub = sub.unwrap();
    assert_eq!(sub.result.status, TaskStatus::HandedBack, "{}", sub.result.error);
    assert!(sub.result.error.contains("battery at 25%"), "{}", sub.result.error);
    assert_eventually(ACT, "the handed-back training stopped and freed its slot", || {
        worker.shared.worker.computing.load(Ordering::SeqCst) == 0
            && worker.shared.worker.active_tasks.load(Ordering::SeqCst) == 0
    })
    .await;

    // Paused: new tasks are refused, the advert says why, clients pass it over.
    let (status, why) = infer_status(client, key, model).await;
    assert_eq!(status, TaskStatus::Refused, "{why}");
    assert!(why.contains("paused: battery at 25%"), "{why}");
    assert_eventually(WAIT, "the client sees the pause", || !chosen(client, &model, key)).await;
    let advert = client.peers().into_iter().find(|(k, _)| *k == key).unwrap().1.advert;
    assert!(
        advert
            .availability
            .describe(advert.power)
            .starts_with("paused: battery at 25%")
    );

    // Plugged in, it works again at once, low as the battery is.
    phone.set(25, true, 30.0);
    assert_eventually(ACT, "charging resumes the worker", || paused(worker).is_none()).await;
    assert_eq!(infer_status(client, key, model).await.0, TaskStatus::Done);
    assert_eventually(WAIT, "the client chooses it again", || chosen(client, &model, key)).await;

    // Heat pauses it until it has cooled below the lower temperature.
    phone.set(90, true, 46.0);
    assert_eventually(ACT, "the heat pauses it", || {
        paused(worker).is_some_and(|p| p.contains("too hot"))
    })
    .await;
    phone.set(90, true, 42.0);
    // Three readings at 42 C: between the two levels, still paused.
    tokio::time::sleep(Duration::from_millis(3200)).await;
    assert!(paused(worker).is_some(), "42 C is above the resume level");
    let (status, why) = infer_status(client, key, model).await;
    assert_eq!(status, TaskStatus::Refused, "{why}");
    assert!(why.contains("too hot"), "{why}");
    phone.set(90, true, 38.0);
    assert_eventually(ACT, "cooled down, it works again", || paused(worker).is_none()).await;
    assert_eq!(infer_status(client, key, model).await.0, TaskStatus::Done);
    for n in nodes {
        n.shutdown().await;
    }
}

/// A phone that holds its shard (it would train for a long while) is
/// unplugged below its level mid-shard: it hands the shard back, the
/// client gives it to another worker, and the job ends with the adapter a
/// local replay computes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_whose_phone_pauses_mid_shard_ends_with_the_same_adapter() {
    let phone = Phone::new("job-phone");
    let policy = phone.policy();
    let nodes = spawn_nodes(3, |i, c: &mut Config| {
        if i == 1 {
            c.power = policy.clone();
            // Holds every task it takes until it is handed back.
            c.fault = Some(Fault::Stall);
        }
    })
    .await;
    wait_for_swarm(&nodes[0], 3).await;
    let victim = nodes[1].public_key();
    let s = setup(&nodes[0], Verify::None);
    let failures = Arc::new(Mutex::new(Vec::new()));
    let seen = failures.clone();
    let on = move |e: &Event| {
        if let Event::Failed { worker, why, .. } = e {
            seen.lock().unwrap().push((*worker, why.clone()));
        }
    };
    let shared = nodes[0].shared.clone();
    let spec = s.spec.clone();
    let running = tokio::spawn(async move { job::run(&shared.client, spec, &on).await });
    let busy = |n: &NodeHandle| n.shared.worker.active_tasks.load(Ordering::SeqCst);
    assert_eventually(WAIT, "the phone holds a shard", || busy(&nodes[1]) == 1).await;
    phone.set(20, false, 30.0);
    let state = running.await.unwrap().unwrap();
    assert!(state.finished);
    assert_eq!(adapter_of(&nodes[0], &state), reference(&s, &nodes[0])[1]);
    let failures = failures.lock().unwrap().clone();
    assert!(
        failures
            .iter()
            .any(|(w, why)| *w == victim && why.contains("the worker paused: battery at 20%")),
        "{failures:?}"
    );
    assert!(state.reassigned >= 1);
    // Handing back is the worker keeping its word: recorded as such, not
    // as a failure.
    assert!(state.workers[&victim].handed_back >= 1, "{:?}", state.workers);
    assert!(
        state.excluded().is_empty(),
        "pausing is not cheating: {:?}",
        state.workers
    );
    assert_eq!(busy(&nodes[1]), 0, "the phone holds nothing");
    for n in nodes {
        n.shutdown().await;
    }
}
